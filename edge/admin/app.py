"""The admin HTTP API (aiohttp): health, metrics, and JSON resources that
mirror the command line under /v1/, with the same validation and messages.

Loopback only unless a bearer token is set (config ``[server] admin_token`` or
``EDGE_ADMIN_TOKEN``); with a token every route but /healthz requires it.

Without a token, any web page the operator's browser opens can reach a
loopback admin: so every request must name the admin itself in ``Host``
(its address, ``localhost``, or ``[server] admin_hosts``: a page on a
rebound DNS name is refused), must carry no foreign ``Origin`` (cross-site
requests), and bodies must be ``application/json`` (which a page can only
send cross-site after a CORS preflight, which this API never grants).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from edge.appsettings import Hsts, parse_hsts
from edge.operations import NotFoundError, OperationError, Operations, Result, Upload
from edge.store.base import StoreError

OPENAPI = Path(__file__).with_name("openapi.json")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Node(Protocol):
    """What the admin API and the probes ask of the edge process serving them
    (``edge.server.Edge``), so that this package never imports the server."""

    async def health_problems(self) -> list[str]:
        """Why this process should not get traffic now; empty when it is fine."""
        ...
    def corrupted_entries(self, limit: int = 100) -> dict[str, str]: ...
    def bound_https(self) -> list[str]: ...
    def bound_http(self) -> list[str]: ...
    def store_state(self) -> dict[str, object]:
        """``store`` (loading, loaded, stale copy) and ``stale_since`` for /healthz."""
        ...
    async def store_problems(self) -> list[str]: ...
    @property
    def reloads(self) -> int: ...
    async def reload_store(self) -> None: ...


def _result(result: Result, status: int = 200) -> web.Response:
    return web.json_response({"message": result.message, "warnings": list(result.warnings)}, status=status)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise OperationError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise OperationError("the body must be a JSON object")
    return data


def _hsts(data: dict[str, Any]) -> Hsts | bool | None:
    """``"hsts"``: absent keeps the app's, null drops it, an object sets it."""
    if "hsts" not in data:
        return None
    if data["hsts"] is None:
        return False
    try:
        return parse_hsts(data["hsts"])
    except ValueError as exc:
        raise OperationError(str(exc)) from None


def _upload(data: dict[str, Any]) -> Upload | None:
    cert, key = data.get("cert"), data.get("key")
    if cert is None and key is None:
        return None
    if not isinstance(cert, str) or not isinstance(key, str):
        raise OperationError('give both "cert" and "key" as PEM strings, or neither')
    return Upload(cert.encode(), key.encode(), "cert", "key")


def _split_host(host: str) -> tuple[str, str]:
    """``name:port``, ``[v6]:port`` or ``name`` -> (name, port or "")."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, colon, port = host.rpartition(":")
    return (name, port) if colon else (host, "")


def _host_allowed(request: web.Request, names: tuple[str, ...]) -> bool:
    """``Host`` names this admin: the address the connection reached (the IP, or
    ``localhost`` on loopback) with its port or none, or a configured name."""
    host = request.headers.get("Host")
    if host is None:  # HTTP/1.0 without Host: not a browser
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return False
    name, port = _split_host(host)
    name = name.lower().rstrip(".")
    if name in names:
        return True
    # A browser always names a non-default port in Host (RFC 9110 §7.2), so a
    # Host without one never comes from a page aimed at this port: health
    # checkers and scripts send the bare address.
    if port and port != str(sockname[1]):
        return False
    local = ipaddress.ip_address(sockname[0].split("%")[0])
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:  # dual-stack socket
        local = local.ipv4_mapped
    if name == "localhost":
        return local.is_loopback
    try:
        return ipaddress.ip_address(name) == local
    except ValueError:
        return False


def _browser_check(request: web.Request, names: tuple[str, ...]) -> web.Response | None:
    """A refusal for a request a web page could have sent, or None."""
    if not _host_allowed(request, names):
        return _error(421, f"Host {request.headers.get('Host')!r} is not this admin API's address; "
                           "add the name to [server] admin_hosts if it is yours")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() not in (f"http://{request.host}".lower(),
                                                     f"https://{request.host}".lower()):
        return _error(403, f"cross-origin request from {origin!r} refused")
    if request.method in ("POST", "PUT", "PATCH", "DELETE") and (
            request.body_exists or "Content-Type" in request.headers) and request.content_type != "application/json":
        return _error(415, "send the body as JSON with Content-Type: application/json")
    return None


def _guard(token: str, names: tuple[str, ...]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = _browser_check(request, names)
        if refusal is not None:
            return refusal
        if token and request.path != "/healthz":
            supplied = request.headers.get("Authorization", "")
            if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        try:
            return await handler(request)
        except NotFoundError as exc:
            return _error(404, str(exc))
        except OperationError as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")

    return guard


def _probes(edge: Node, registry: CollectorRegistry) -> tuple[Handler, Handler]:
    """/healthz and /metrics, served by the admin API and by ``[server] metrics``."""

    async def healthz(_request: web.Request) -> web.Response:
        problems = await edge.health_problems()
        # Damaged store entries do not make a node unhealthy (every node would be): they are named here.
        corrupted = edge.corrupted_entries()
        if problems:
            return web.json_response({"status": "unhealthy", "reasons": problems, "corrupted": corrupted},
                                     status=503)
        # "loading": serving already, every name answered (fetched on demand) while the index fills.
        # "stale copy": serving what the store held when last seen (unreachable, or catching up
        # after a start from the local copy); healthy: nothing served is wrong, only maybe old.
        store = edge.store_state()
        if store["stale_since"] is not None:
            store["store_problems"] = await edge.store_problems()
        return web.json_response({"status": "ok", "https": edge.bound_https(), "http": edge.bound_http(),
                                  **store, "corrupted": corrupted})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return healthz, metrics


def make_metrics_app(edge: Node, registry: CollectorRegistry, hosts: tuple[str, ...]) -> web.Application:
    """/metrics and /healthz alone, without a token: for Prometheus and probes."""
    healthz, metrics = _probes(edge, registry)
    app = web.Application(middlewares=[_guard("", hosts)], client_max_size=1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_probes(edge: Node, registry: CollectorRegistry, hosts: tuple[str, ...],
                       host: str, port: int) -> web.AppRunner:
    """Serve ``make_metrics_app`` on host:port (``[server] metrics``); OSError when it cannot bind."""
    runner = web.AppRunner(make_metrics_app(edge, registry, hosts), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()  # a successor (--takeover) binds it too
    except OSError:
        await runner.cleanup()
        raise
    return runner


def make_app(edge: Node, ops: Operations, registry: CollectorRegistry, token: str,
             hosts: tuple[str, ...]) -> web.Application:
    """The whole admin API; ``hosts``: ``[server] admin_hosts``, the names it answers to."""
    healthz, metrics = _probes(edge, registry)

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")

    async def apps_list(_request: web.Request) -> web.Response:
        return web.json_response(await ops.apps())

    async def apps_add(request: web.Request) -> web.Response:
        data = await _body(request)
        backends = data.get("backends")
        if not isinstance(data.get("app"), str) or not isinstance(backends, list):
            raise OperationError('give "app" (a name) and "backends" (a list of "host:port")')
        force_https = data.get("force_https", True)
        maintenance = data.get("maintenance")
        if not isinstance(force_https, bool) or not isinstance(maintenance, bool | None):
            raise OperationError('"force_https" and "maintenance" must be true or false')
        result = await ops.apps_add(data["app"], [str(b) for b in backends], force_https, hsts=_hsts(data),
                                    maintenance=maintenance)
        return _result(result, 201)

    async def error_page(request: web.Request) -> web.Response:
        status = request.match_info["status"]
        if not status.isdigit():
            raise OperationError("the status is 502, 503 or 504")
        html = None
        if request.method == "PUT":
            html = (await _body(request)).get("html")
            if not isinstance(html, str):
                raise OperationError('give "html": the page, a string')
        page = html.encode() if html is not None else None
        return _result(await ops.apps_error_page(request.match_info["app"], int(status), page, '"html"'))

    async def apps_remove(request: web.Request) -> web.Response:
        return _result(await ops.apps_remove(request.match_info["app"]))

    async def domains_list(request: web.Request) -> web.Response:
        return web.json_response(await ops.domains(request.query.get("app")))

    async def domains_add(request: web.Request) -> web.Response:
        data = await _body(request)
        if not isinstance(data.get("domain"), str) or not isinstance(data.get("app"), str):
            raise OperationError('give "domain" and "app"')
        return _result(await ops.domains_add(data["domain"], data["app"], _upload(data)), 201)

    async def certificate_put(request: web.Request) -> web.Response:
        upload = _upload(await _body(request))
        if upload is None:
            raise OperationError('give "cert" and "key" as PEM strings')
        return _result(await ops.domains_ssl(request.match_info["domain"], upload))

    async def certificate_delete(request: web.Request) -> web.Response:
        return _result(await ops.domains_ssl(request.match_info["domain"], None, disable=True))

    async def domains_remove(request: web.Request) -> web.Response:
        return _result(await ops.domains_remove(request.match_info["domain"]))

    async def reload(_request: web.Request) -> web.Response:
        await edge.reload_store()
        return web.json_response({"message": "store reloaded", "reloads": edge.reloads})

    app = web.Application(middlewares=[_guard(token, hosts)], client_max_size=256 * 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/apps", apps_list)
    app.router.add_post("/v1/apps", apps_add)
    app.router.add_delete("/v1/apps/{app}", apps_remove)
    app.router.add_put("/v1/apps/{app}/error-pages/{status}", error_page)
    app.router.add_delete("/v1/apps/{app}/error-pages/{status}", error_page)
    app.router.add_get("/v1/domains", domains_list)
    app.router.add_post("/v1/domains", domains_add)
    app.router.add_put("/v1/domains/{domain}/certificate", certificate_put)
    app.router.add_delete("/v1/domains/{domain}/certificate", certificate_delete)
    app.router.add_delete("/v1/domains/{domain}", domains_remove)
    app.router.add_post("/v1/reload", reload)
    return app
