"""Entry point: `ctscan serve inference --host H --port P` (or `python -m services.inference.main`)."""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def serve(*, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    from services.inference.app import create_app
    from services.inference.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One process: the models, their batchers and the thread pools are shared by all requests.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="ctscan inference service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    serve(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
