"""The ``edge`` command line (SPEC §4).

Management commands write to the configured store and exit; running edge
processes follow the store and apply the change at once. Exit status 0 on
success; non-zero with one clear line on stderr on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from edge import config as config_mod
from edge import names
from edge.appsettings import MAX_ERROR_PAGE, Hsts
from edge.operations import OperationError, Operations, Result, Upload, acme_summary
from edge.records import split_bundle
from edge.store.base import CERTS, Store, StoreError
from edge.store.index import Index
from edge.store.open import open_store
from edge.tls import bundle as bundles

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CLOSED_STDOUT = 141  # what a shell reports for a program killed by SIGPIPE (`edge domains | head`)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="SNI-terminating TLS edge proxy")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("EDGE_CONFIG", config_mod.DEFAULT_CONFIG)),
        help="configuration file (default: $EDGE_CONFIG or config/edge.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Accept --config after the command too: `edge serve --config FILE`.
        p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    p = command("serve", "run the proxy")
    p.add_argument("--takeover", action="store_true",
                   help="take over the running edge's listening sockets, to replace it (deploy/OPERATIONS.md: Upgrade)")
    command("check", "validate the configuration and the store")

    p = command("apps-add", "add an app, or change its backends")
    p.add_argument("app")
    p.add_argument("--backend", action="append", required=True, metavar="HOST:PORT")
    p.add_argument("--no-force-https", action="store_true", help="serve plain HTTP too instead of redirecting")
    hsts = p.add_mutually_exclusive_group()
    hsts.add_argument("--hsts", type=int, metavar="SECONDS",
                      help="send Strict-Transport-Security: max-age=SECONDS on HTTPS answers (RFC 6797)")
    hsts.add_argument("--no-hsts", action="store_true", help="stop sending Strict-Transport-Security")
    p.add_argument("--hsts-subdomains", action="store_true", help="with --hsts: includeSubDomains")
    p.add_argument("--hsts-preload", action="store_true", help="with --hsts: preload")
    maintenance = p.add_mutually_exclusive_group()
    maintenance.add_argument("--maintenance", action="store_true", default=None,
                             help="answer 503 with the maintenance page; the backends are not contacted")
    maintenance.add_argument("--no-maintenance", dest="maintenance", action="store_false", help="serve again")
    p = command("apps-error-page", "replace the body of the 502/503/504 answers edge makes for an app")
    p.add_argument("app")
    p.add_argument("file", nargs="?", metavar="FILE", help="an HTML file, UTF-8, at most 64 KiB")
    p.add_argument("--status", type=int, required=True, choices=[502, 503, 504])
    p.add_argument("--remove", action="store_true", help="serve edge's own page again")
    p = command("apps-remove", "remove an app (its domains first)")
    p.add_argument("app")
    p = command("apps", "list apps")
    p.add_argument("--json", action="store_true")

    p = command("domains-add", "attach a domain to an app, optionally with its certificate")
    p.add_argument("domain")
    p.add_argument("--app", required=True)
    p.add_argument("--cert", metavar="FILE")
    p.add_argument("--key", metavar="FILE")
    p = command("domains-ssl", "set or drop the custom certificate of a domain")
    p.add_argument("domain")
    p.add_argument("--cert", metavar="FILE")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("--disable", action="store_true", help="drop the custom certificate (acme takes over)")
    p = command("domains-remove", "detach a domain and drop its certificates")
    p.add_argument("domain")
    p = command("domains", "list domains: app, serving source, key types, expiry, status")
    p.add_argument("--app")
    p.add_argument("--json", action="store_true")

    p = command("certs-import", "bulk import of PEM bundles (chain + key per file, crt directories, crt-lists); "
                "exit status 0 when all imported, 3 when some files or names were skipped (the rest imported), "
                "1 when nothing could be imported")
    p.add_argument("--app", required=True)
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = command("csr", "write DOMAIN.key (0600) and DOMAIN.csr to send to a CA")
    p.add_argument("domain")
    p.add_argument("--key-type", default="rsa2048", choices=["rsa2048", "rsa4096", "ec256", "ec384"])
    p.add_argument("--subject", default="", help='e.g. "/C=FR/O=Example" (CN defaults to DOMAIN)')
    p.add_argument("--out-dir", type=Path, default=Path("."))
    return parser


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"edge: error: {message}", file=sys.stderr)
    return code


def _print_result(result: Result) -> None:
    for warning in result.warnings:
        print(f"edge: warning: {warning}", file=sys.stderr)
    print(result.message)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(str(v) for v in value) or "-"
        return "-" if value is None else str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


async def _check(cfg: config_mod.Config) -> int:
    problems: list[str] = []
    platform = cfg.platform
    for path in (platform.cert, platform.key):
        if not path.exists() and not platform.dev_certificates:
            problems.append(f"{path}: no such file ([platform] cert/key)")
    store = open_store(cfg)
    try:
        store_problems = await store.check()
        if store_problems:
            for problem in problems + store_problems:
                print(f"edge: error: {problem}", file=sys.stderr)
            return EXIT_ERROR
        index, damaged = await _load_checked(store)
        problems += await store.leftovers()
    finally:
        await store.close()
    for key, error in sorted({**index.errors, **damaged}.items()):
        problems.append(f"store entry {key}: {error}")
    for domain, app in sorted(index.domains.items()):
        if app not in index.apps:
            problems.append(f"domain {domain} points to missing app {app}")
    problems += _name_problems(cfg, index)
    for domain in sorted(d for d in index.certs if d not in index.domains):
        problems.append(
            f"certificates of {domain} belong to no domain (a command killed midway, or a hand edit): they "
            f"are not served; attach it with `edge domains-add {domain} --app APP`, or attach and remove it "
            "(`edge domains-remove`) to drop them"
        )
    for problem in problems:
        print(f"edge: error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print(f"{cfg.path}: ok ({len(index.apps)} apps, {len(index.domains)} domains, "
          f"{sum(len(c) for c in index.certs.values())} certificates)")
    return 0


def _name_problems(cfg: config_mod.Config, index: Index) -> list[str]:
    """Stored domains that `domains-add` would refuse (written by hand or by an
    older edge): a public suffix, a name under the platform domain, a name not
    in canonical form (never matched: SNI and Host are canonicalised)."""
    ops = Operations(cfg, None)  # type: ignore[arg-type] - only the name rules, no store
    out = []
    for domain in sorted(index.domains.keys() | index.certs.keys()):
        try:
            canonical = ops.domain_name(domain)
        except OperationError as exc:
            out.append(f"stored domain {domain}: {exc}")
            continue
        if canonical != domain:
            out.append(f"stored domain {domain} is not in canonical form ({canonical}); it never matches")
    return out


async def _load_checked(store: Store) -> tuple[Index, dict[str, str]]:
    """The index, and the certificate entries whose PEM cannot be served (the
    index reads only their headers: a bundle damaged inside is found here)."""
    index = Index()
    damaged: dict[str, str] = {}
    async for key, value in store.snapshot():
        index.apply_put(key, value)
        if key.startswith(CERTS) and key not in index.errors:
            problem = bundles.stored_problem(split_bundle(value)[1])
            if problem is not None:
                damaged[key] = problem
    return index, damaged


async def _run(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    cmd = args.command
    if cmd == "check":
        return await _check(cfg)
    store = open_store(cfg)
    try:
        return await _run_command(args, cfg, Operations(cfg, store))
    finally:
        await store.close()


async def _run_command(args: argparse.Namespace, cfg: config_mod.Config, ops: Operations) -> int:
    cmd = args.command
    if cmd == "apps-add":
        hsts = _hsts(args)
        result = await ops.apps_add(args.app, args.backend, force_https=not args.no_force_https, hsts=hsts,
                                    maintenance=args.maintenance)
        _print_result(result)
    elif cmd == "apps-error-page":
        if args.remove == (args.file is not None):
            return _fail("give FILE, or --remove", EXIT_USAGE)
        _print_result(await ops.apps_error_page(args.app, args.status, _read_page(args.file), args.file or ""))
    elif cmd == "apps-remove":
        _print_result(await ops.apps_remove(args.app))
    elif cmd == "apps":
        rows = await ops.apps()
        columns = ["app", "backends", "force_https", "hsts", "maintenance", "error_pages", "domains"]
        print(json.dumps(rows, indent=2) if args.json else _table(rows, columns))
    elif cmd == "domains-add":
        if (args.cert is None) != (args.key is None):
            return _fail("give both --cert and --key, or neither", EXIT_USAGE)
        upload = Upload.from_files(args.cert, args.key) if args.cert and args.key else None
        _print_result(await ops.domains_add(args.domain, args.app, upload))
    elif cmd == "domains-ssl":
        if args.disable and (args.cert or args.key):
            return _fail("--disable takes no --cert/--key", EXIT_USAGE)
        if not args.disable and (args.cert is None or args.key is None):
            return _fail("give --cert FILE and --key FILE, or --disable", EXIT_USAGE)
        upload = Upload.from_files(args.cert, args.key) if args.cert and args.key else None
        _print_result(await ops.domains_ssl(args.domain, upload, args.disable))
    elif cmd == "domains-remove":
        _print_result(await ops.domains_remove(args.domain))
    elif cmd == "certs-import":
        from edge.importer import import_bundles

        report = await import_bundles(ops, args.app, args.paths, progress=True)
        for problem in report.skipped_files:
            print(f"edge: skipped: {problem}", file=sys.stderr)
        for problem in report.skipped_names:
            print(f"edge: skipped name: {problem}", file=sys.stderr)
        print(f"imported {report.imported_names} names from {report.files - len(report.skipped_files)} of "
              f"{report.files} files into app {args.app}"
              + (f"; {len(report.skipped_files)} files skipped" if report.skipped_files else ""))
        return report.exit_code
    elif cmd == "domains":
        rows = await ops.domains(args.app)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            columns = ["domain", "app", "serving", "key_types", "expires", "status"]
            if any(row["acme"] for row in rows):
                columns.append("acme")
                rows = [dict(row, acme=acme_summary(row["acme"])) for row in rows]
            print(_table(rows, columns))
    return 0


def _hsts(args: argparse.Namespace) -> Hsts | bool | None:
    if args.no_hsts:
        return False
    if args.hsts is None:
        if args.hsts_subdomains or args.hsts_preload:
            raise OperationError("--hsts-subdomains and --hsts-preload go with --hsts SECONDS")
        return None
    if args.hsts < 0:
        raise OperationError(f"--hsts {args.hsts}: give a number of seconds, 0 or more (0 tells browsers to forget)")
    return Hsts(args.hsts, args.hsts_subdomains, args.hsts_preload)


def _read_page(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(MAX_ERROR_PAGE + 1)
    except OSError as exc:
        raise OperationError(f"{path}: {exc.strerror}") from None


def _csr(args: argparse.Namespace) -> int:
    from edge.tls import csr

    domain = names.normalize_pattern(args.domain)
    if domain is None:
        return _fail(f"{args.domain!r} is not a valid domain name")
    try:
        key_pem, csr_pem = csr.make_csr(domain, args.key_type, args.subject)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    stem = domain.replace("*", "_")
    key_path = args.out_dir / f"{stem}.key"
    csr_path = args.out_dir / f"{stem}.csr"
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _fail(f"{key_path} exists; move it away first (it may be the key of a certificate in use)")
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    csr_path.write_bytes(csr_pem)
    print(f"wrote {key_path} (private key, mode 0600) and {csr_path}; send {csr_path} to your CA, then "
          f"`edge domains-ssl {domain} --cert CERT.pem --key {key_path}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here for output still buffered
    except BrokenPipeError:
        # The reader went away (`edge domains | head`): stop quietly. Point stdout at
        # /dev/null so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_STDOUT
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "csr":
        return _csr(args)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        return _fail(str(exc))
    if args.command == "serve":
        if args.takeover:
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, takeover=True))
        return _serve(cfg)
    try:
        return asyncio.run(_run(args, cfg))
    except (OperationError, StoreError) as exc:
        return _fail(str(exc))


def _serve(cfg: config_mod.Config) -> int:
    import uvloop

    from edge import logs
    from edge.errors import StartupError
    from edge.workers import serve

    logs.setup(cfg.log)
    try:
        if cfg.server.workers > 1:
            from edge.workers import supervise

            return supervise(cfg)
        uvloop.run(serve(cfg))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
