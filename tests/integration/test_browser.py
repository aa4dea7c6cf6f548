"""Headless Chromium through edge (issue #19): a page of many resources loads
over ONE HTTP/2 connection, and its WebSocket goes over HTTP/1.1 on a second
connection, because edge does not send SETTINGS_ENABLE_CONNECT_PROTOCOL
(RFC 8441 §3: without it a client must not use extended CONNECT, so browsers
fall back to the HTTP/1.1 Upgrade of RFC 6455 §4). Checked from both sides:
edge's access log (`protocol`, status) and handshake counter, and the browser's
DevTools protocol (CDP) view of each response and the Performance API. And
the browser's connection coalescing (RFC 9113 §9.1.1) across two apps under
the wildcard certificate, each stream routed by its :authority."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.conftest import EdgeProcess, free_port, require_tool, wait_for

HOST = "page.edge.test"
CDN = "cdn.edge.test"  # another app under the same wildcard certificate
IMAGES = SCRIPTS = 24  # 48 resources: more than six HTTP/1.1 connections would carry one at a time
# The smallest valid GIF (1x1, transparent): the browser decodes it, so `naturalWidth` proves it arrived.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edge h2 page</title>
<link rel="icon" href="data:,">
{scripts}
</head><body>
{images}
<p id="echo"></p>
<script>
// Opened once every resource is in, so an HTTP/2 connection to this origin
// exists and the browser chooses, from its SETTINGS, not to put the WebSocket on it.
window.echoed = new Promise((resolve, reject) => {{
  addEventListener("load", () => {{
    const ws = new WebSocket(`wss://${{location.host}}/ws`);
    ws.onopen = () => ws.send("hello from chromium");
    ws.onmessage = (event) => {{
      document.getElementById("echo").textContent = event.data;
      resolve(event.data);
      ws.close();
    }};
    ws.onerror = () => reject(new Error("websocket failed"));
  }});
}});
</script>
</body></html>
"""


def page_html(images_from: str = "") -> str:
    scripts = "\n".join(f'<script src="/s/{n}.js"></script>' for n in range(SCRIPTS))
    images = "\n".join(f'<img src="{images_from}/i/{n}.gif" width="1" height="1">' for n in range(IMAGES))
    return PAGE.format(scripts=scripts, images=images)


# --- the application behind edge: the page, its resources, a WebSocket echo ------------------


@pytest.fixture(scope="module")
def page_backend() -> Iterator[tuple[str, str]]:
    """The application on two ports: two backends, for two apps."""
    no_store = {"Cache-Control": "no-store"}

    async def page(request: web.Request) -> web.Response:
        html = page_html(request.query.get("images_from", ""))
        return web.Response(text=html, content_type="text/html", headers=no_store)

    async def script(request: web.Request) -> web.Response:
        text = f"window.scriptsRun = (window.scriptsRun || 0) + 1; // {request.match_info['n']}\n"
        return web.Response(text=text, content_type="text/javascript", headers=no_store)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=GIF, content_type="image/gif", headers=no_store)

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/page", page)
    app.router.add_get("/s/{n}.js", script)
    app.router.add_get("/i/{n}.gif", image)
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    sites = [web.TCPSite(runner, "127.0.0.1", 0), web.TCPSite(runner, "127.0.0.1", 0)]
    for site in sites:
        loop.run_until_complete(site.start())
    first, second = (f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}" for site in sites)  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield first, second
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, page_backend: tuple[str, str]) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge-browser"))
    process.metrics_port = free_port()  # type: ignore[attr-defined]
    text = process.config.read_text().replace(
        'admin = ""', f'admin = ""\nmetrics = "127.0.0.1:{process.metrics_port}"'  # type: ignore[attr-defined]
    ).replace('level = "debug"', 'level = "info"\naccess_log = true')
    process.config.write_text(text)
    process.start()
    process.cli("apps-add", "page", "--backend", page_backend[0])
    process.cli("apps-add", "cdn", "--backend", page_backend[1])
    process.wait_routed(HOST, "/page")
    process.wait_routed(CDN, "/page")
    yield process
    process.stop()


def handshakes(edge: EdgeProcess) -> int:
    """Full and resumed TLS handshakes edge completed (edge_handshakes_total, result="ok")."""
    url = f"http://127.0.0.1:{edge.metrics_port}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(m.group(1)) for m in re.finditer(r'^edge_handshakes_total\{result="ok"[^}]*\} (\S+)$',
                                                          text, re.MULTILINE)))


def access_lines(edge: EdgeProcess) -> list[dict[str, Any]]:
    return [json.loads(line[line.index("{"):]) for line in bytes(edge.log).decode(errors="replace").splitlines()
            if '"request_id":' in line]


def new_access_lines(edge: EdgeProcess, since: int, expected: int) -> list[dict[str, Any]]:
    """The access lines after the first ``since``, once there are ``expected`` of them."""
    def enough() -> list[dict[str, Any]] | None:
        new = access_lines(edge)[since:]
        return new if len(new) >= expected else None

    return wait_for(enough, timeout=10)


# --- a small DevTools protocol client over aiohttp's WebSocket client --------------------------


class Chromium:
    """Debian's chromium, headless, on a fresh profile, driven over CDP."""

    def __init__(self, profile: Path, leaf_pem: bytes) -> None:
        binary = require_tool("chromium")
        # Edge's certificate (the dev CA's *.edge.test leaf) is trusted by its key: Chromium
        # then treats it as valid, as it would a certificate from a CA it trusts.
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        self.profile = profile
        self.netlog = profile.parent / "netlog.json"  # every socket Chromium opened, for a failure's diagnosis
        profile.mkdir(parents=True, exist_ok=True)
        self.stderr = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MiB, too little for a renderer
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--host-resolver-rules=MAP *.edge.test 127.0.0.1",
             "--ignore-certificate-errors-spki-list=" + base64.b64encode(hashlib.sha256(spki).digest()).decode(),
             f"--log-net-log={self.netlog}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True,
        )

    def devtools_url(self) -> str:
        """The browser's CDP endpoint, from the DevToolsActivePort file it writes once listening."""
        active = self.profile / "DevToolsActivePort"

        def ready() -> str | None:
            assert self.proc.poll() is None, f"chromium exited: {self.log()}"
            lines = active.read_text().split("\n") if active.exists() else []
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 and lines[1] else None

        return wait_for(ready, timeout=60, interval=0.1)

    def log(self) -> str:
        return (self.profile.parent / "chromium.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Its renderer and utility processes are in the session started for it, and only they.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stderr.close()


class Cdp:
    """Commands and events on one CDP WebSocket (flattened sessions, one reader)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    async def _next(self, deadline: float) -> dict[str, Any]:
        message = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"CDP connection ended: {message!r}")
        return json.loads(message.data)

    async def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> Any:
        self.last_id += 1
        request: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if session:
            request["sessionId"] = session
        await self.ws.send_json(request)
        deadline = time.monotonic() + timeout
        while True:
            message = await self._next(deadline)
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    async def event(self, method: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        """The first event ``method`` whose parameters include ``match``."""
        def found() -> dict[str, Any] | None:
            return next((e["params"] for e in self.events if e.get("method") == method
                         and match.items() <= e["params"].items()), None)

        deadline = time.monotonic() + timeout
        while (params := found()) is None:
            self.events.append(await self._next(deadline))
        return params

    def all(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e.get("method") == method]


# What the page saw, once its WebSocket echoed (or failed, or 20 s passed).
REPORT = """(async () => {
  const echo = await Promise.race([window.echoed,
    new Promise((_, reject) => setTimeout(() => reject(new Error("no echo in 20 s")), 20000))]);
  return JSON.stringify({
    echo, dom: document.getElementById("echo").textContent, scripts: window.scriptsRun || 0,
    images: [...document.images].filter((img) => img.complete && img.naturalWidth === 1).length,
    navigation: performance.getEntriesByType("navigation")[0].nextHopProtocol,
    resources: performance.getEntriesByType("resource").map((e) => [e.name, e.nextHopProtocol]),
  });
})()"""


async def load_page(endpoint: str, url: str) -> tuple[dict[str, Any], Cdp]:
    async with aiohttp.ClientSession() as http, http.ws_connect(endpoint, max_msg_size=0) as ws:
        cdp = Cdp(ws)
        # A new browser context is a fresh, incognito-like profile. Not the default one: on a
        # cold origin its loading predictor preconnects two sockets before it knows the origin
        # speaks h2 (Chromium closes the spare once h2 is negotiated), so edge would count one
        # more full handshake that carried nothing, by Chromium's choice, not edge's.
        context = (await cdp.call("Target.createBrowserContext"))["browserContextId"]
        target = (await cdp.call("Target.createTarget", url="about:blank", browserContextId=context))["targetId"]
        session = (await cdp.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        await cdp.call("Network.enable", session)
        await cdp.call("Page.enable", session)
        await cdp.call("Page.setLifecycleEventsEnabled", session, enabled=True)
        navigation = await cdp.call("Page.navigate", session, url=url)
        assert "errorText" not in navigation, navigation
        # The load event of this navigation (the about:blank before it has its own).
        await cdp.event("Page.lifecycleEvent", name="load", loaderId=navigation["loaderId"])
        result = await cdp.call("Runtime.evaluate", session, expression=REPORT, awaitPromise=True,
                                returnByValue=True, timeout=40)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        await cdp.call("Target.disposeBrowserContext", browserContextId=context)
        return json.loads(result["result"]["value"]), cdp


@pytest.fixture
def chromium(tmp_path: Path, edge: EdgeProcess) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "profile", (edge.root / "dev" / "platform.crt").read_bytes())
    yield browser
    browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_chromium_loads_the_page_over_one_h2_connection_and_its_websocket_over_http1(
    edge: EdgeProcess, chromium: Chromium
) -> None:
    endpoint = chromium.devtools_url()
    before, logged_before = handshakes(edge), len(access_lines(edge))  # wait_routed's probes came first
    url = f"https://{HOST}:{edge.https_port}/page"
    seen, cdp = asyncio.run(load_page(endpoint, url))

    # The browser's side: everything arrived, the echo came back, all of it over h2.
    assert seen["echo"] == seen["dom"] == "echo:hello from chromium", seen
    assert (seen["scripts"], seen["images"]) == (SCRIPTS, IMAGES), seen
    assert seen["navigation"] == "h2"
    resources = [name for name, _ in seen["resources"]]
    assert len(resources) == IMAGES + SCRIPTS, resources
    assert {protocol for _, protocol in seen["resources"]} == {"h2"}, seen["resources"]
    responses = [r["response"] for r in cdp.all("Network.responseReceived")]
    assert len(responses) == 1 + IMAGES + SCRIPTS
    assert {r["protocol"] for r in responses} == {"h2"}
    assert len({r["connectionId"] for r in responses}) == 1, "the page and its resources share one connection"
    (upgrade,) = cdp.all("Network.webSocketHandshakeResponseReceived")
    assert upgrade["response"]["status"] == 101

    # Edge's side: every request in the access log, h2 for the page and its resources, HTTP/1.1 and 101 for the
    # WebSocket (logged once the browser closed it), and two handshakes in all: the WebSocket's HTTP/1.1 connection
    # cannot be the h2 one (ALPN chose one protocol per connection), so all 49 h2 requests came on ONE connection.
    expected = 2 + IMAGES + SCRIPTS
    lines = new_access_lines(edge, logged_before, expected)
    assert len(lines) == expected, lines
    by_path = {line["path"]: line for line in lines}
    websocket = by_path.pop("/ws")
    assert (websocket["protocol"], websocket["status"], websocket["method"]) == ("HTTP/1.1", 101, "GET")
    assert set(by_path) == {"/page"} | {f"/s/{n}.js" for n in range(SCRIPTS)} | {f"/i/{n}.gif" for n in range(IMAGES)}
    assert {(line["protocol"], line["status"]) for line in by_path.values()} == {("HTTP/2", 200)}
    assert all("HeadlessChrome" in line["user_agent"] for line in lines)
    assert handshakes(edge) - before == 2, f"one TLS connection for the page, one for the WebSocket ({chromium.netlog})"


def test_chromium_coalesces_another_app_under_the_wildcard_onto_the_same_connection(
    edge: EdgeProcess, chromium: Chromium, page_backend: tuple[str, str]
) -> None:
    """RFC 9113 §9.1.1: the certificate of page.edge.test covers cdn.edge.test
    (*.edge.test) and both names resolve to the same address, so Chromium sends
    the images for cdn.edge.test on the page's connection; edge routes each
    stream by its :authority, to the other app's backend."""
    endpoint = chromium.devtools_url()
    before, logged_before = handshakes(edge), len(access_lines(edge))
    images_from = f"https://{CDN}:{edge.https_port}"
    seen, cdp = asyncio.run(load_page(endpoint, f"https://{HOST}:{edge.https_port}/page?images_from={images_from}"))

    assert seen["echo"] == "echo:hello from chromium" and seen["images"] == IMAGES, seen
    responses = [r["response"] for r in cdp.all("Network.responseReceived")]
    assert sum(r["url"].startswith(images_from + "/") for r in responses) == IMAGES
    assert {r["protocol"] for r in responses} == {"h2"}
    assert len({r["connectionId"] for r in responses}) == 1, "both names on one connection"

    lines = new_access_lines(edge, logged_before, 2 + IMAGES + SCRIPTS)
    cdn = [line for line in lines if line["host"] == CDN]
    assert len(cdn) == IMAGES
    assert {(line["protocol"], line["status"], line["backend"]) for line in cdn} == {("HTTP/2", 200, page_backend[1])}
    assert {line["backend"] for line in lines if line["host"] == HOST} == {page_backend[0]}
    assert handshakes(edge) - before == 2, f"one connection for both names, one for the WebSocket ({chromium.netlog})"
