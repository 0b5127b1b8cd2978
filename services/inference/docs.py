"""API documentation pages that work offline: Swagger UI at /docs, ReDoc at /redoc.

FastAPI's own pages load their scripts and styles from a CDN (and ReDoc's fonts from Google),
so on a hospital network without internet /docs is a blank page. Here the pages load the same
files from this service: the Swagger UI and ReDoc distributions that the pinned
`fastapi-offline` package ships (only its static folder is used), following FastAPI's
"Custom Docs UI Static Assets" recipe.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from services.inference.auth import PUBLIC, public_mount

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
STATIC_URL = "/docs-static"
# No "validator" badge: Swagger UI would otherwise send the schema to an online validator.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# The browser loads nothing from elsewhere (ReDoc's footer links a logo on its CDN; blocked,
# the logo hides itself). FastAPI's pages start the viewers with an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


def docs_static_dir() -> Path:
    """swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    import fastapi_offline  # type: ignore[import-untyped]

    return Path(fastapi_offline.__file__).parent / "static"


def install_offline_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc from local files; create the app with docs_url=redoc_url=None."""
    if app.docs_url or app.redoc_url:
        raise ValueError("create the FastAPI app with docs_url=None and redoc_url=None")
    app.router.routes.append(public_mount(STATIC_URL, StaticFiles(directory=docs_static_dir()), name="docs-static"))
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False, dependencies=[PUBLIC])
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(oauth2_redirect_url, include_in_schema=False, dependencies=[PUBLIC])
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False, dependencies=[PUBLIC])
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png", with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
