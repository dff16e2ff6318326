"""/docs and /redoc work on an air-gapped host: the pages and everything they load (Swagger
UI, ReDoc, their CSS, the favicon, the OpenAPI document) come from the service itself, never
from a CDN or Google Fonts. tests/e2e/test_docs_offline.py renders them in Chromium."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest

from tests.api.conftest import Api

BASE = "http://api"
# What each kind of reference must answer with (the start of its Content-Type).
JS = ("text/javascript", "application/javascript")
KINDS = {"script": JS, "stylesheet": ("text/css",), "icon": ("image/",),
         "spec": ("application/json",), "page": ("text/html",)}


class _Refs(HTMLParser):
    """Every URL a page refers to, with what it is, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        rel = values.get("rel", "").lower()
        if tag == "script":
            self._in_script = "src" not in values
            if "src" in values:
                self.refs.append(("script", values["src"]))
        elif tag == "link" and "href" in values:
            self.refs.append(("stylesheet" if "stylesheet" in rel else
                              "icon" if "icon" in rel else "other", values["href"]))
        elif tag == "redoc" and "spec-url" in values:
            self.refs.append(("spec", values["spec-url"]))
        else:
            for name in ("src", "href", "srcset", "data", "poster", "action"):
                if values.get(name):
                    self.refs.append(("other", values[name]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def _page_refs(api: Api, path: str) -> tuple[str, list[tuple[str, str]]]:
    response = api.client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    parser = _Refs()
    parser.feed(response.text)
    refs = list(parser.refs)
    for script in parser.scripts:  # Swagger UI's set-up: the spec and the OAuth2 redirect
        refs += [("spec", url) for url in re.findall(r"\burl:\s*'([^']*)'", script)]
        refs += [("page", url) for url in
                 re.findall(r"oauth2RedirectUrl:\s*window\.location\.origin\s*\+\s*'([^']*)'",
                            script)]
    return response.text, refs


def _assert_served(api: Api, page: str, kind: str, ref: str) -> str:
    """``ref`` (from ``page``) is same-origin and answers 200 with its kind's type."""
    url = urljoin(BASE + page, ref)
    assert urlsplit(url)[:2] == urlsplit(BASE)[:2], f"{page} refers off-site: {ref}"
    response = api.client.get(url)
    assert response.status_code == 200, f"{page} -> {ref}: {response.status_code}"
    content_type = response.headers["content-type"]
    assert content_type.startswith(KINDS[kind]), f"{page} -> {ref}: {content_type}"
    return response.text if kind in ("stylesheet", "script") else ""


@pytest.mark.parametrize("page, expected", [
    ("/docs", {"script", "stylesheet", "icon", "spec", "page"}),
    ("/redoc", {"script", "icon", "spec"}),
])
def test_docs_pages_load_everything_from_the_service(api: Api, page: str,
                                                     expected: set[str]) -> None:
    html, refs = _page_refs(api, page)
    for kind, ref in refs:
        body = _assert_served(api, page, kind, ref)
        if kind == "stylesheet":  # what the CSS pulls in: inline data only, or same-origin
            for css_ref in re.findall(r"""url\(\s*['"]?([^'")\s]+)""", body) + \
                    re.findall(r"""@import\s+['"]([^'"]+)""", body):
                if not css_ref.startswith("data:"):
                    _assert_served(api, urljoin(page, ref), "icon", css_ref)
        if kind == "script":
            assert ("SwaggerUIBundle" if page == "/docs" else "Redoc") in body[:4096]
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]", html, re.I), \
        f"{page} names an absolute URL:\n{html}"
    assert "fonts.googleapis" not in html and "fonts.gstatic" not in html
    assert {kind for kind, _ in refs} == expected, refs


def test_swagger_ui_shows_no_validator_badge(api: Api) -> None:
    """Swagger UI's default badge is an image from validator.swagger.io (on any host but
    localhost): the service turns it off."""
    html, _ = _page_refs(api, "/docs")
    assert '"validatorUrl": null' in html


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_docs_pages_allow_loads_from_the_service_only(api: Api, page: str) -> None:
    """The bundles name outside URLs of their own (ReDoc's footer logo is on cdn.redoc.ly):
    each page's Content-Security-Policy lets the browser load from the service only, and
    runs the page's own inline scripts by hash."""
    response = api.client.get(page)
    assert response.status_code == 200, response.text
    policy = dict(directive.strip().split(" ", 1) for directive in
                  response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'"
    allowed = re.compile(r"'self'|'none'|'unsafe-inline'|'sha256-[A-Za-z0-9+/]+={0,2}'|data:|blob:")
    for directive, sources in policy.items():
        assert all(allowed.fullmatch(source) for source in sources.split()), (directive, sources)
    assert "'unsafe-inline'" not in policy["script-src"]
    inline = re.findall(r"<script>(.*?)</script>", response.text, re.S)
    hashes = {"'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
              + "'" for script in inline}
    assert set(policy["script-src"].split()) == {"'self'", *hashes}
