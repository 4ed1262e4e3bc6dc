"""The ``seadragon-proxy`` command: serve, whitelist, keys, check, explain, stats, doctor.

``main(argv)`` parses arguments and is the only place that decides the exit status:
0 done, 1 a problem the message explains (bad config, bad address, database), 2 bad usage.
Every error is one sentence on stderr; what reaches the terminal has control characters
escaped (``textsafe``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn, TextIO

from multidict import CIMultiDict

from . import __version__
from .defaults import describe as describe_defaults
from .exceptions import ConfigError, DatabaseError
from .history import parse_since, summarize
from .keys import PREFIX, KeyRing, KeyStore
from .logs import configure_logging
from .netaddr import LOOPBACK, NetworkSet, parse_address
from .policy import RequestFacts
from .routes import classify
from .rulesfile import KEY_NAME
from .settings import Settings, config_path, load_settings
from .tenants import describe_tenant
from .textsafe import SafeText, escape
from .whitelist import WhitelistStore

PROG = "seadragon-proxy"


class Failure(Exception):
    """A message for the user and exit status 1."""


class UsageError(Exception):
    """Bad usage: one sentence and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1 to 64)")
    return int(text)


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _key_name(text: str) -> str:
    if not KEY_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a key name: letters, digits and . _ - (at most 64), "
            "starting with a letter or digit"
        )
    return text


def _since(text: str) -> str:
    try:
        parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A priority-queue reverse proxy for Ollama.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config_help = "the YAML file (default: $SEADRAGON_CONFIG, else config/seadragon.yaml)"
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the proxy")
    serve.add_argument("--host", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", type=_port, help="port to listen on (overrides server.port)")
    serve.add_argument("--upstream", metavar="URL", help="Ollama's URL (overrides upstream.url)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="N processes sharing the port, one replica each (needs queue.backend: redis)",
    )
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by --workers

    wl = sub.add_parser("whitelist", help="show or change the whitelist")
    wl_sub = wl.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = wl_sub.add_parser("add", parents=[common], help="allow an address or network")
    add.add_argument("entry", metavar="ADDR_OR_CIDR")
    add.add_argument("--note", default="", help="why it is there (shown by 'list')")
    remove = wl_sub.add_parser("remove", parents=[common], help="remove an address or network")
    remove.add_argument("entry", metavar="ADDR_OR_CIDR")
    listing = wl_sub.add_parser("list", parents=[common], help="print the whitelist")
    listing.add_argument("--json", action="store_true", help="print JSON")

    keys = sub.add_parser("keys", help="make, list or remove API keys (match.api_key)")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    kadd = keys_sub.add_parser("add", parents=[common], help="make a key; it is printed once")
    kadd.add_argument("name", type=_key_name, metavar="NAME")
    kadd.add_argument("--note", default="", help="who holds it (shown by 'list')")
    kremove = keys_sub.add_parser("remove", parents=[common], help="revoke a key")
    kremove.add_argument("name", type=_key_name, metavar="NAME")
    klist = keys_sub.add_parser("list", parents=[common], help="print the key names")
    klist.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("check", parents=[common], help="validate the config; print the source rules")

    stats = sub.add_parser(
        "stats", parents=[common], help="requests, waits, tokens and errors per source and model"
    )
    stats.add_argument(
        "--since",
        default="24h",
        type=_since,
        help="a duration (30m, 24h, 7d) or an ISO time (default 24h)",
    )
    stats.add_argument(
        "--by",
        choices=("source", "model", "tenant"),
        action="append",
        help="the tables to print, repeatable (default source and model)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON (as /api/admin/stats)")

    doctor = sub.add_parser(
        "doctor", parents=[common], help="check the set-up end to end: config, database, Ollama"
    )
    doctor.add_argument(
        "--generate",
        metavar="MODEL",
        help="also stream one token of MODEL, direct and via the proxy",
    )

    explain = sub.add_parser(
        "explain", parents=[common], help="which source and priority a request would get"
    )
    explain.add_argument(
        "--ip", default="127.0.0.1", type=_address, help="client address (default 127.0.0.1)"
    )
    explain.add_argument("--method", default="POST", help="HTTP method (default POST)")
    explain.add_argument("--path", default="/api/chat", help="request path (default /api/chat)")
    explain.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="repeatable"
    )
    explain.add_argument("--model", help="the model named in the body")
    explain.add_argument(
        "--api-key",
        metavar="NAME_OR_KEY",
        help="the request carries this API key: a key name, or the key itself (sdp_...)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(escape(str(e)), file=sys.stderr)
        return 2
    out: TextIO = SafeText(sys.stdout)  # type: ignore[assignment]  # write/flush suffice
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "doctor":
            from .doctor import run as doctor  # its checks load the config themselves

            return asyncio.run(doctor(config_path(args.config), sys.stdout, generate=args.generate))
        settings = load_settings(config_path(args.config))
        if args.command == "whitelist":
            return asyncio.run(_whitelist(args, settings, out))
        if args.command == "keys":
            return asyncio.run(_keys(args, settings, out))
        if args.command == "check":
            return asyncio.run(_check(settings, out))
        if args.command == "stats":
            return asyncio.run(_stats(args, settings, out))
        return asyncio.run(_explain(args, settings, out))
    except (Failure, ConfigError, DatabaseError) as e:
        print(f"{PROG}: {escape(str(e))}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(escape(str(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `seadragon-proxy ... | head`: the reader is done, so are we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _serve(args: argparse.Namespace) -> int:
    from .server import serve  # aiohttp's server is only needed here

    settings = load_settings(config_path(args.config)).override(
        host=args.host, port=args.port, upstream=args.upstream
    )
    if args.workers > 1 and settings.queue.backend != "redis":
        raise UsageError(
            f"{PROG} serve: --workers {args.workers} needs queue.backend: redis, because each "
            "worker is its own process and only Redis lets them share one queue and its slots"
        )
    reuse_port = False
    if args.worker is not None:  # one of --workers N, started by the parent below
        from .replicas.workers import set_parent_death_signal, worker_name

        set_parent_death_signal()
        server = replace(settings.server, replica=worker_name(settings.server.replica, args.worker))
        settings = replace(settings, server=server)
        reuse_port = True
    configure_logging(settings.log)
    try:
        if args.workers > 1 and args.worker is None:
            from .replicas.workers import supervise

            argv = ["--config", str(config_path(args.config))]
            if args.upstream is not None:
                argv += ["--upstream", args.upstream]
            return asyncio.run(
                supervise(args.workers, argv, settings.server.host, settings.server.port)
            )
        return asyncio.run(serve(settings, reuse_port=reuse_port, worker=reuse_port))
    except OSError as e:
        raise Failure(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {e.strerror or e}"
        ) from e


def _print_list(
    rows: list[dict[str, str]], first: str, empty: str, as_json: bool, out: TextIO
) -> None:
    """``whitelist list`` and ``keys list``: JSON, or one aligned line per row."""
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif not rows:
        print(empty, file=out)
    else:
        width = max(len(r[first]) for r in rows)
        for r in rows:
            print(f"{r[first]:<{width}}  {r['added_at']}  {r['note']}".rstrip(), file=out)


async def _whitelist(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = WhitelistStore(settings.whitelist.database)
    if args.action != "add" and not store.path.exists():
        raise Failure(
            f"whitelist database {store.path} does not exist yet; it is created (with loopback "
            "on it) when the proxy starts or by 'seadragon-proxy whitelist add'"
        )
    if args.action == "list":
        rows = [
            {"network": e.network, "note": e.note, "added_at": e.added_at}
            for e in await store.entries()
        ]
        _print_list(rows, "network", f"the whitelist in {store.path} is empty", args.json, out)
        return 0
    try:
        if args.action == "add":
            network, new = await store.add(args.entry, args.note)
            verb = "added" if new else "updated the note of"
            print(f"{verb} {network} in {store.path}", file=out)
            await _share(settings, {network: args.note}, out)
            return 0
        network, found = await store.remove(args.entry)
    except ValueError as e:
        hint = (
            ""
            if "did you mean" in str(e)
            else "; give an address (10.0.0.7, ::1) or a network (10.0.0.0/8)"
        )
        raise Failure(f"{e}{hint}") from e
    if not found:
        raise Failure(f"{network} is not on the whitelist in {store.path}; nothing removed")
    print(f"removed {network} from {store.path}", file=out)
    await _share(settings, {network: None}, out)
    if network in LOOPBACK:
        print(f"note: {network} is now refused by sources that require the whitelist", file=out)
    return 0


async def _keys(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    store = KeyStore(settings.whitelist.database)
    if args.action != "add" and not store.path.exists():
        raise Failure(
            f"database {store.path} does not exist yet; it is created when the proxy starts "
            "or by 'seadragon-proxy keys add NAME'"
        )
    if args.action == "list":
        rows = [
            {"name": e.name, "note": e.note, "added_at": e.added_at} for e in await store.entries()
        ]
        _print_list(rows, "name", f"no API keys in {store.path}", args.json, out)
        return 0
    if args.action == "add":
        try:
            key = await store.add(args.name, args.note)
        except ValueError as e:
            raise Failure(str(e)) from e
        print(key, file=out)  # stdout holds the key alone: `KEY=$(seadragon-proxy keys add x)`
        print(
            f"added API key {args.name!r} to {store.path}; it is shown only now (only its "
            "SHA-256 is stored). Clients send it as 'Authorization: Bearer <key>' "
            "(OLLAMA_API_KEY, an OpenAI client's api_key).",
            file=sys.stderr,
        )
        unused = not any(
            s.match is not None and args.name in s.match.api_key for s in settings.policy.sources
        )
        if unused:
            print(
                f"note: no source lists {args.name!r} under match.api_key yet; until one "
                "does, the key counts as whitelisted and nothing more",
                file=sys.stderr,
            )
        return 0
    if not await store.remove(args.name):
        raise Failure(f"no API key is named {args.name!r} in {store.path}; nothing removed")
    print(f"removed API key {args.name!r} from {store.path}", file=out)
    return 0


async def _share(settings: Settings, changes: dict[str, str | None], out: TextIO) -> None:
    """With ``queue.backend: redis``, tell every replica at once (replicas/whitelistsync.py).
    Redis away: the file has the change, and a replica using it shares it when it can."""
    if settings.queue.backend != "redis":
        return
    import redis.asyncio as redis
    from redis.exceptions import RedisError

    from .replicafile import redacted
    from .replicas.whitelistsync import publish

    r = settings.queue.redis
    client = redis.Redis.from_url(r.url, socket_connect_timeout=2, socket_timeout=5)
    try:
        await publish(client, r.prefix, f"cli/{settings.server.replica}", changes)
    except (RedisError, OSError) as e:
        print(
            f"note: Redis at {redacted(r.url)} is unreachable ({e}); the other replicas hear "
            "of this change when a replica using this file reaches Redis again",
            file=out,
        )
    else:
        print("shared with every replica through Redis", file=out)
    finally:
        await client.aclose()


async def _check(settings: Settings, out: TextIO) -> int:
    policy = settings.policy
    print(f"{settings.file}: OK", file=out)
    fleet = settings.fleet
    where = ", ".join(
        f"{e.url} with {e.slots} {'slot' if e.slots == 1 else 'slots'}"
        + (f" ({e.name})" if settings.upstreams else "")
        for e in fleet
    )
    print(
        f"listening on {settings.server.host}:{settings.server.port}, forwarding to {where}",
        file=out,
    )
    print("sources, first match wins (lower priority number is served first):", file=out)
    width = max(len(s.name) for s in policy.sources)
    for index, source in enumerate(policy.sources):
        what = source.match.describe() if source.match else "everything"
        extra = "  [requires whitelist]" if source.require_whitelist else ""
        if source.fairness.fair_by != "none":
            extra += f"  [fair by {source.fairness.fair_by}]"
        print(
            f"  [{index}] {source.name:<{width}}  priority {source.priority:<3}  {what}{extra}",
            file=out,
        )
    print(f"default_source: {policy.default.name}", file=out)
    wanted = sorted({n for s in policy.sources if s.match for n in s.match.api_key})
    if wanted:
        store = KeyStore(settings.whitelist.database)
        try:
            have = {e.name for e in await store.entries()} if store.path.exists() else set()
        except DatabaseError as e:  # the config is what `check` checks; say so, still OK
            print(f"note: cannot see which API keys exist: {e}", file=out)
            return 0
        for name in wanted:
            if name not in have:
                print(
                    f"note: match.api_key names {name!r}, which is not a key yet "
                    f"(seadragon-proxy keys add {name}); the rule matches nothing until it is",
                    file=out,
                )
    return 0


async def _stats(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as e:
        raise Failure(str(e)) from e
    path = settings.whitelist.database
    if not path.exists():
        raise Failure(f"database {path} does not exist yet; it is created when the proxy starts")
    summary = await summarize(path, since)
    if args.json:
        json.dump(summary.as_dict(), out, indent=2)
        out.write("\n")
        return 0
    doc = summary.as_dict()
    print(f"requests from {doc['since']} to {doc['until']} ({path})", file=out)
    tables = {"source": summary.sources, "model": summary.models, "tenant": summary.tenants}
    for key in args.by or ("source", "model"):
        groups = tables[key]
        print(file=out)
        if not groups:
            print(f"no requests by {key}", file=out)
            continue
        header = ("requests", "errors", "hung up", "wait p50", "wait p95", "tokens")
        width = max(len(key), *(len(str(g.name)) for g in groups))
        print(f"{key:<{width}}  " + "  ".join(f"{h:>9}" for h in header), file=out)
        for g in groups:
            cells = (
                g.requests,
                g.errors,
                g.hung_up,
                _secs(g.wait_p50),
                _secs(g.wait_p95),
                g.tokens,
            )
            name = "-" if g.name is None else g.name
            print(f"{name:<{width}}  " + "  ".join(f"{c:>9}" for c in cells), file=out)
    if summary.servers:
        print(file=out)
        width = max(len("server"), *(len(s.name) for s in summary.servers))
        print(f"{'server':<{width}}  {'requests':>9}  {'swaps':>9}", file=out)
        for s in summary.servers:
            print(f"{s.name:<{width}}  {s.requests:>9}  {s.swaps:>9}", file=out)
    return 0


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


async def _explain(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    try:
        ip = parse_address(args.ip)
    except ValueError as e:
        raise Failure(str(e)) from e
    headers: CIMultiDict[str] = CIMultiDict()
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"{PROG} explain: --header {header!r} must look like 'Name: value'")
        headers.add(name.strip(), value.strip())
    store = WhitelistStore(settings.whitelist.database)
    if store.path.exists():
        whitelist = await store.load()  # unreadable: DatabaseError, reported by main()
        where = str(store.path)
    else:
        whitelist = NetworkSet.parse(LOOPBACK)
        where = f"{store.path} does not exist yet; a new one holds loopback only"
    keys = KeyStore(store.path)
    key = await _explain_key(args.api_key, keys, store.path.exists()) if args.api_key else None
    prefix, path = settings.policy.split_path(args.path)
    route = classify(args.method.upper(), path)
    on_list = ip in whitelist
    whitelisted = on_list or key is not None
    decision = settings.policy.classify(
        RequestFacts(ip, route.path, headers, args.model, whitelisted, prefix, key, on_list)
    )
    source = decision.source
    print(f"source:    {source.name} (priority {source.priority})", file=out)
    print(f"decided:   {decision.explain()}", file=out)
    tenant = describe_tenant(source, str(ip), headers) if route.queued else "none (never queued)"
    print(f"tenant:    {tenant}", file=out)
    if prefix is not None:
        print(f"path:      under {prefix}; Ollama sees {route.path}", file=out)
    state = "is on" if on_list else "is not on"
    print(f"whitelist: {ip} {state} the whitelist ({where})", file=out)
    if key is not None:
        print(f"api key:   {key!r}, which counts as whitelisted", file=out)
    if source.require_whitelist and not whitelisted:
        print(f"outcome:   refused with 403: {source.name!r} requires the whitelist", file=out)
    elif route.queued:
        print(f"outcome:   queued at priority {source.priority}, then forwarded", file=out)
    else:
        print("outcome:   forwarded at once (not an inference route, so never queued)", file=out)
    options = describe_defaults(settings.defaults, source.name, args.model, route.path)
    print(f"options:   {options}", file=out)
    return 0


async def _explain_key(given: str, store: KeyStore, exists: bool) -> str:
    """``--api-key``: a key (``sdp_...``, looked up by its hash) or a key's name."""
    path = store.path
    if given.startswith(PREFIX):
        ring = await store.load() if exists else KeyRing()
        name = ring.identify(given)
        if name is None:
            raise Failure(f"--api-key: that key is not in {path}; it would pass through unknown")
        return name
    if not KEY_NAME.match(given):
        raise UsageError(f"{PROG} explain: --api-key {given!r} is neither a key name nor a key")
    names = {e.name for e in await store.entries()} if exists else set()
    if given not in names:
        raise Failure(f"--api-key: no API key is named {given!r} in {path}")
    return given


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
