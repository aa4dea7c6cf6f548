"""The admin HTTP API (aiohttp): health, metrics, and JSON resources that
mirror the command line under /v1/, with the same validation and messages.

Loopback only unless a bearer token is set (config ``[server] admin_token`` or
``EDGE_ADMIN_TOKEN``); with a token every route but /healthz requires it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.metrics import registry_for
from edge.operations import NotFoundError, OperationError, Operations, Result, Upload
from edge.store.base import StoreError

if TYPE_CHECKING:
    from edge.server import Edge

OPENAPI = Path(__file__).with_name("openapi.json")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _result(result: Result, status: int = 200) -> web.Response:
    return web.json_response({"message": result.message, "warnings": list(result.warnings)}, status=status)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OperationError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise OperationError("the body must be a JSON object")
    return data


def _upload(data: dict[str, Any]) -> Upload | None:
    cert, key = data.get("cert"), data.get("key")
    if cert is None and key is None:
        return None
    if not isinstance(cert, str) or not isinstance(key, str):
        raise OperationError('give both "cert" and "key" as PEM strings, or neither')
    return Upload(cert.encode(), key.encode(), "cert", "key")


def make_app(edge: Edge, token: str) -> web.Application:
    ops = Operations(edge.config, edge.store)
    registry = registry_for(edge)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
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

    async def healthz(_request: web.Request) -> web.Response:
        problems = await edge.health_problems()
        # Damaged store entries do not make a node unhealthy (every node would be): they are named here.
        corrupted = edge.corrupted_entries()
        if problems:
            return web.json_response({"status": "unhealthy", "reasons": problems, "corrupted": corrupted},
                                     status=503)
        # "loading": serving already, every name answered (fetched on demand) while the index fills.
        return web.json_response({"status": "ok", "https": edge.bound_https(), "http": edge.bound_http(),
                                  "store": "loading" if edge.index.loading else "loaded",
                                  "corrupted": corrupted})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

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
        if not isinstance(force_https, bool):
            raise OperationError('"force_https" must be true or false')
        return _result(await ops.apps_add(data["app"], [str(b) for b in backends], force_https), 201)

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

    app = web.Application(middlewares=[guard], client_max_size=256 * 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/apps", apps_list)
    app.router.add_post("/v1/apps", apps_add)
    app.router.add_delete("/v1/apps/{app}", apps_remove)
    app.router.add_get("/v1/domains", domains_list)
    app.router.add_post("/v1/domains", domains_add)
    app.router.add_put("/v1/domains/{domain}/certificate", certificate_put)
    app.router.add_delete("/v1/domains/{domain}/certificate", certificate_delete)
    app.router.add_delete("/v1/domains/{domain}", domains_remove)
    app.router.add_post("/v1/reload", reload)
    return app
