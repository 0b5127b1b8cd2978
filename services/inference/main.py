"""Entry point: `ctscan serve inference --host H --port P` (or `python -m services.inference.main`)."""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_PORT = 8000


def serve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    import uvicorn

    from ctscan.settings import get_inference_settings
    from services.inference.app import create_app

    settings = get_inference_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One process: the models, their batchers and the thread pools are shared by all requests.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=10)


def cli_serve(args: argparse.Namespace) -> None:
    """`ctscan serve inference` (registered in pyproject.toml's `ctscan.services` entry points)."""
    serve(host=args.host, port=args.port or DEFAULT_PORT)


def main() -> None:
    parser = argparse.ArgumentParser(description="ctscan inference service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args()
    serve(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
