"""Swagger UI (/docs) and ReDoc (/redoc) served from the service: they work on an air-gapped host.

FastAPI's own pages load Swagger UI and ReDoc from jsDelivr, the favicon from
fastapi.tiangolo.com and ReDoc's fonts from Google Fonts. These pages load the copies that the
fastapi-offline package ships (Swagger UI 5, ReDoc 2 and FastAPI's favicon, kept current by
its releases), mounted at ASSETS_URL, with ReDoc's Google Fonts off and Swagger UI's
validator badge (an image from validator.swagger.io, shown on any host but localhost) off.

The bundles still name a few outside URLs of their own (ReDoc's menu footer shows
cdn.redoc.ly's logo). Each page therefore carries a Content-Security-Policy that lets it
load only from the service itself (and inline data), so the browser never reaches out: the
footer shows its text without the logo.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
# Over FastAPI's Swagger UI defaults: no validator badge.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _page(page: HTMLResponse) -> HTMLResponse:
    """FastAPI's ``page`` with a policy that allows nothing from elsewhere: scripts from the
    service and the page's own inline ones (by hash), styles, images and fonts from the
    service or inline, fetches (the spec, Swagger UI's "Try it out") to the service only."""
    html = bytes(page.body).decode()
    scripts = "".join(
        " 'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html))
    policy = "; ".join([
        "default-src 'self'", f"script-src 'self'{scripts}", "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:", "font-src 'self' data:", "worker-src 'self' blob:",
        "connect-src 'self'", "object-src 'none'", "base-uri 'self'", "form-action 'self'",
        "frame-ancestors 'self'"])
    page.headers["Content-Security-Policy"] = policy
    return page


def mount_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve /docs, its OAuth2 redirect page, /redoc and their assets. ``app`` must be built
    with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages off)."""
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url
    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR, check_dir=True),
              name="docs-assets")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _page(get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=oauth2_redirect_url and root + oauth2_redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={**SWAGGER_UI_PARAMETERS, **(app.swagger_ui_parameters or {})},
        ))

    if oauth2_redirect_url:
        @app.get(oauth2_redirect_url, include_in_schema=False)
        async def swagger_ui_oauth2_redirect() -> HTMLResponse:
            return _page(get_swagger_ui_oauth2_redirect_html())

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _page(get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        ))
