"""/docs and /redoc render in a real browser with no network but the service.

Headless Chromium (Debian's ``chromium``; .ci/run installs it) opens each page of a real
server under a made-up host name, ``docs.test`` (Swagger UI skips its validator badge on
``localhost`` and ``127.0.0.1`` only): the host resolver maps that one name to 127.0.0.1 and
every other name to NXDOMAIN, and every other request goes to a proxy that is not there. The
DOM is dumped once the page is idle. Its network log must hold no request of the page's to
anywhere but the service, and the console no load that the page's policy blocked from the
service itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Server, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install chromium; "
    ".ci/run installs it)")

HOST = "docs.test"
OPERATIONS = {("POST", "/v1/lowerings"), ("GET", "/v1/lowerings/{job_id}"),
              ("GET", "/v1/lowerings"), ("POST", "/v1/uploads"), ("GET", "/healthz")}


@pytest.fixture(scope="module")
def docs_server(start_server: Callable[..., Server]) -> Server:
    """A server whose pages are up: no priming, not waited ready (no worker is needed)."""
    server = start_server(ready=False, workers=1, prime_workers="false")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{server.url}/docs", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no /docs from the server:\n{server.log()[-4000:]}")
        time.sleep(0.1)


@dataclass
class Rendered:
    origin: str  # http://docs.test:PORT/
    dom: str  # once the page was idle
    requests: list[str]  # the URLs the page asked for (its navigation included)
    console: list[str]  # the page's console lines


def _page_requests(netlog: Path) -> list[str]:
    """The page's navigation and what it initiated. Chromium's own requests (updates,
    accounts, autofill) have no initiator and are left out."""
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [event["params"] for event in log["events"]
              if event["type"] == start_job and "url" in event.get("params", {})]
    return [params["url"] for params in starts
            if params.get("initiator", "").startswith(f"http://{HOST}:")
            or (params.get("request_type") == "main frame"
                and params["url"].startswith(f"http://{HOST}:"))]


def render(server: Server, path: str, tmp_path: Path) -> Rendered:
    """Open ``path`` in headless Chromium, offline but for the server."""
    origin = f"http://{HOST}:{urlsplit(server.url).port}/"
    netlog = tmp_path / "netlog.json"
    argv = [
        str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-default-apps", f"--user-data-dir={tmp_path / 'p'}",
        f"--host-resolver-rules=MAP {HOST} 127.0.0.1, MAP * ~NOTFOUND",
        f"--proxy-server=http://127.0.0.1:{free_port()}", f"--proxy-bypass-list={HOST}",
        f"--log-net-log={netlog}", "--enable-logging=stderr", "--v=0",
        # Virtual time runs only while nothing is loading: the budget is spent after the
        # assets and the spec have arrived and the page has rendered.
        "--virtual-time-budget=15000", "--dump-dom", origin + path.lstrip("/"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(origin, done.stdout, _page_requests(netlog), console)


def _assert_offline(page: Rendered, path: str) -> None:
    origin = page.origin
    assert f"{origin}openapi.json" in page.requests, \
        f"the net log names none of the page's requests: {page.requests}"
    assert origin + path.lstrip("/") in page.requests, page.requests
    assert [url for url in page.requests if not url.startswith(origin)] == [], page.requests
    # The page's Content-Security-Policy may block loads from elsewhere (ReDoc's footer
    # logo from cdn.redoc.ly), never the service's own scripts, styles or fetches.
    for line in page.console:
        if "Content Security Policy" in line:
            blocked = re.search(r"'(https?://[^']+)'", line)
            assert blocked and not blocked.group(1).startswith(origin), line


def test_swagger_ui_renders_the_operations_offline(docs_server: Server,
                                                   tmp_path: Path) -> None:
    page = render(docs_server, "/docs", tmp_path)
    rendered = set(re.findall(r'opblock-summary-method">([A-Z]+)</span>.*?'
                              r'data-path="([^"]+)"', page.dom))
    assert OPERATIONS <= rendered, \
        f"Swagger UI rendered {sorted(rendered)}:\n{page.dom[-3000:]}\n{page.console}"
    assert "Lowering service" in page.dom
    _assert_offline(page, "/docs")


def test_redoc_renders_the_operations_offline(docs_server: Server, tmp_path: Path) -> None:
    page = render(docs_server, "/redoc", tmp_path)
    rendered = {(verb.upper(), path) for verb, path in re.findall(
        r'http-verb [a-z]+">([a-z]+)</span>\s*<span[^>]*>([^<]+)</span>', page.dom)}
    assert OPERATIONS <= rendered, \
        f"ReDoc rendered {sorted(rendered)}:\n{page.dom[-3000:]}\n{page.console}"
    assert "Lowering service" in page.dom
    _assert_offline(page, "/redoc")
