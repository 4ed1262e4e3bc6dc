"""``python -m bench``: start the processes, run the scenarios, print one table, save JSON.

Exit status: 0 when every scenario ran (missed targets are figures, not failures), 1 when a
scenario failed or the time budget ran out (the table then shows what was measured), 2 for
bad usage. Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from . import client, machine, sampling
from .children import START_TIMEOUT, start_fake, start_proxy
from .context import Bench, Sizes
from .haproxy import haproxy_version, start_haproxy
from .redis_child import redis_url, start_redis
from .report import Report, Row, render, write_json
from .rpc import ChildError
from .runtime import LOOPS, loop_version, raise_nofile_limit, run
from .scenarios import SCENARIOS
from .scenarios.workers import NEEDS_QUEUE, redis_queue_present
from .targets import Direct, Fake, HAProxy, Proxied, Target

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = 720.0  # seconds (twelve scenarios, four fronts); then up to 10 s per child to stop
WARM_UP = 50
WITH_REDIS = ("1", "2")  # the "handoff gap and added latency with the Redis backend"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure seadragon-proxy side by side with a direct connection "
        "to a fake Ollama (and HAProxy, when it is on PATH).",
    )
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="the proxy's loop")
    parser.add_argument(
        "--peer-loop",
        choices=LOOPS,
        default="asyncio",
        help="the fake Ollama's and the load generator's loop",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated scenario numbers (default: all: %(default)s)",
    )
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy column")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the harness")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="sample the proxy with py-spy into DIR"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for everything")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {list(SCENARIOS)}")
    for loop in {args.loop, args.peer_loop}:
        if loop_version(loop) is None:
            parser.error(f"{loop} is not installed: .venv/bin/python -m pip install {loop}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    return run(bench_main(args), args.peer_loop)


def progress(began: float, message: str) -> None:
    print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)


async def start_targets(
    stack: contextlib.AsyncExitStack, workdir: Path, args: argparse.Namespace
) -> tuple[Fake, list[Target], str | None]:
    """Start the fake, the proxy and HAProxy; the stack stops them, last started first.
    The third value is HAProxy's version, ``None`` when it does not run."""
    fake_child = await start_fake(workdir, args.peer_loop)
    stack.push_async_callback(fake_child.stop)
    proxy_child = await start_proxy(workdir, fake_child.url, args.loop)
    stack.push_async_callback(proxy_child.stop)
    fake = Fake(fake_child)
    targets: list[Target] = [Direct(fake), Proxied(proxy_child)]
    if redis_queue_present():  # the Redis backend's column, once its queue is merged
        redis_child = await start_redis(workdir)
        if redis_child is not None:
            stack.push_async_callback(redis_child.stop)
            child = await start_proxy(workdir, fake_child.url, args.loop, redis_url(redis_child))
            stack.push_async_callback(child.stop)
            targets.append(Proxied(child, "proxy-redis"))
    haproxy = None if args.no_haproxy else shutil.which("haproxy")
    if haproxy is None:
        return fake, targets, None
    haproxy_child = await start_haproxy(haproxy, workdir, fake_child.port)
    stack.push_async_callback(haproxy_child.stop)
    stats = await stack.enter_async_context(client.session(connections=1))
    target = HAProxy(haproxy_child, stats)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            await target.queued()  # answered once HAProxy has read its config and runs
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ChildError(f"haproxy did not start ({e!r}):\n{haproxy_child.log_tail()}") from e
    targets.append(target)
    return fake, targets, await haproxy_version(haproxy)


async def warm_up(targets: list[Target]) -> None:
    async with client.session() as s, asyncio.timeout(30):
        for target in targets:
            for _ in range(WARM_UP):
                await client.generate(s, target.url, client.body("warm up"))


@contextlib.asynccontextmanager
async def maybe_profiled(args: argparse.Namespace, pid: int, key: str) -> AsyncIterator[None]:
    if args.profile is None:
        yield
        return
    async with sampling.sampled(pid, args.profile / f"scenario-{key}.txt"):
        yield


async def run_scenarios(
    bench: Bench, proxy_pid: int, args: argparse.Namespace, report: Report, began: float
) -> None:
    for key in args.scenarios:
        name, scenario, limit = SCENARIOS[key]
        progress(began, f"scenario {key}: {name}")
        try:
            async with maybe_profiled(args, proxy_pid, key), asyncio.timeout(limit):
                report.rows += await scenario(bench)
            if key in WITH_REDIS and all(t.name != "proxy-redis" for t in bench.targets):
                why = NEEDS_QUEUE if not redis_queue_present() else "needs redis-server"
                report.rows.append(Row(report.rows[-1].scenario, f"proxy-redis: {why}", "", {}))
        except Exception as e:
            report.errors.append(f"scenario {key} ({name}): {type(e).__name__}: {e}")
            progress(began, f"scenario {key} failed: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):
                await bench.fake.release_all()  # let whatever still waits drain


async def bench_main(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    stamp = datetime.now(UTC)
    sizes = Sizes.quick() if args.quick else Sizes()
    report = Report()
    details: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "started_utc": stamp.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
        "options": {
            "loop": args.loop,
            "peer_loop": args.peer_loop,
            "scenarios": args.scenarios,
            "quick": args.quick,
        },
        "sizes": sizes.__dict__,
        "machine": machine.machine(),
        "software": machine.software(None),
        "source": await machine.revision(),
    }
    with tempfile.TemporaryDirectory(prefix="seadragon-bench-") as tmp:
        try:
            async with contextlib.AsyncExitStack() as stack, asyncio.timeout(args.budget):
                progress(began, "starting the fake Ollama, the proxy and HAProxy")
                fake, targets, haproxy = await start_targets(stack, Path(tmp), args)
                meta["software"]["haproxy"] = haproxy
                progress(began, f"targets: {', '.join(t.name for t in targets)}; warming up")
                await warm_up(targets)
                bench = Bench(fake, targets, sizes, details, Path(tmp))
                proxy_pid = next(t.pid for t in targets if t.name == "proxy")
                await run_scenarios(bench, proxy_pid, args, report, began)
                progress(began, "stopping")
        except TimeoutError:
            report.errors.append(f"the time budget of {args.budget:g} s ran out")
        except (ChildError, aiohttp.ClientError, OSError) as e:
            report.errors.append(f"setting up: {type(e).__name__}: {e}")
    elapsed = time.perf_counter() - began
    meta["machine"]["load_average_at_end"] = os.getloadavg()
    meta["run_seconds"] = round(elapsed, 1)
    meta["details"] = details
    path = args.results / f"{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    write_json(path, report, meta)
    print(headline(meta))
    print(render(report))
    print(f"run time {elapsed:.0f} s; figures in {_relative(path)}")
    if args.profile is not None:
        for raw in sorted(args.profile.glob("scenario-*.txt")):
            print(sampling.summary(raw), file=sys.stderr)
    return 1 if report.errors else 0


def headline(meta: dict[str, Any]) -> str:
    """One line naming what was measured, on what."""
    sw, hw, src, opts = meta["software"], meta["machine"], meta["source"], meta["options"]
    edited = f" + {len(src['uncommitted'])} uncommitted files" if src["uncommitted"] else ""
    return (
        f"seadragon-proxy {sw['seadragon_proxy']} ({src['commit']}{edited}) | proxy loop: "
        f"{opts['loop']}, fake and client: {opts['peer_loop']} | {hw['cpu']}, {hw['cores']} "
        f"cores | Python {sw['python']}, aiohttp {sw['aiohttp']} | {sw['haproxy'] or 'no HAProxy'}"
    )


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
