"""`ctscan serve web`: run the web service under a production WSGI server when one is installed."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

from pydantic import ValidationError

from ctscan.errors import CTScanError
from ctscan.settings import describe_settings_error, get_web_settings
from services.web.app import create_app
from services.web.auth import MULTIPART_OVERHEAD

DEFAULT_PORT = 8080

log = logging.getLogger("ctscan.web")


class WebConfigError(CTScanError):
    """The web service's configuration is missing or refused (one line, no traceback)."""


def cli_serve(args: argparse.Namespace) -> None:
    """`ctscan serve web` (registered in pyproject.toml's `ctscan.services` entry points)."""
    serve(host=args.host, port=args.port or DEFAULT_PORT)


def _stop_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # `docker stop` and Kubernetes send SIGTERM. As a container's PID 1 the process has no
    # default action for it (the kernel drops the signal and the engine kills it 10 s later),
    # so turn it into what waitress does on Ctrl-C: stop accepting, let the requests in
    # flight finish (up to 5 s), exit 0.
    log.info("%s received: stopping the web service", signal.Signals(signum).name)
    raise SystemExit(0)


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Settings are read (and secrets checked) here, so a bad configuration stops the start.
    try:
        settings = get_web_settings()
    except ValidationError as exc:
        raise WebConfigError(f"the web service refuses to start: {describe_settings_error(exc)}") from None
    app = create_app(settings)
    try:
        from waitress import serve as waitress_serve  # type: ignore[import-untyped]
    except ImportError:
        log.warning("waitress is not installed; using Flask's development server")
        app.run(host=host, port=port, debug=False, use_reloader=False)
        return
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    log.info("web service on http://%s:%d (waitress)", host, port)
    # Waitress reads a whole body before the page sees it, into a temporary file above
    # inbuf_overflow (512 KB by default): a DICOM's patient data on the disk. A slice's body
    # stays in memory; a study's larger one goes to TMPDIR, which compose and k8s mount as a
    # memory-backed 0700 tmpfs (docs/security.md). A body announced above the largest limit
    # is refused (413) before it is read.
    largest = max(settings.max_upload_bytes, settings.max_study_bytes) + MULTIPART_OVERHEAD
    waitress_serve(app, host=host, port=port, threads=8, ident="ctscan-web",
                   inbuf_overflow=settings.max_upload_bytes + MULTIPART_OVERHEAD, max_request_body_size=largest)
    log.info("web service stopped")
