"""Fake Ollama servers with residency, in one process of their own:
``python -m bench.residency_child --count N --load SECONDS --job SECONDS ...``.

Each is ``FakeOllama(residency=Residency(...))`` on its own port: models load (an
``asyncio.sleep`` of the load cost), evict and take turns as Ollama's scheduler does. The
control channel (``bench.rpc``) offers:

    wait arrived=n        until n inference requests have arrived, summed over the servers
    gate name=N           open ``gate:N`` on every server
    stats                 per server: loads per model, the most requests in flight at once,
                          and each inference request (model, prompt, arrived/started/
                          finished perf_counter() stamps)
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from aiohttp import web

from seadragon_proxy.fake_ollama import FakeOllama, Residency

from . import rpc
from .fake_child import Tally
from .runtime import LOOPS, raise_nofile_limit, run


def _records(fake: FakeOllama) -> list[dict[str, Any]]:
    out = []
    for seen in fake.inference:
        try:
            doc = json.loads(seen.body)
        except ValueError:
            doc = {}
        out.append(
            {
                "model": doc.get("model"),
                "prompt": doc.get("prompt"),
                "arrived": seen.arrived,
                "started": seen.started,
                "finished": seen.finished,
            }
        )
    return out


class Counted(FakeOllama):
    """A fake whose arrivals are counted, with every other fake's, at the door."""

    tally: Tally | None = None

    def app(self) -> web.Application:
        app = super().app()
        assert self.tally is not None
        app.middlewares.insert(0, self.tally.at_door)
        return app


def control(fakes: list[Counted], tally: Tally) -> dict[str, rpc.Handler]:
    async def wait(message: dict[str, Any]) -> dict[str, object]:
        return await tally.wait(float(message["timeout"]), arrived=int(message["arrived"]))

    async def stats(_: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for fake in fakes:
            assert fake.residency is not None
            out.append(
                {
                    "port": fake.port,
                    "loads": dict(fake.residency.loads),
                    "max_in_flight": fake.max_in_flight,
                    "records": _records(fake),
                }
            )
        return out

    async def gate(message: dict[str, Any]) -> None:
        for fake in fakes:
            fake.gate(str(message["name"])).set()

    return {"wait": wait, "stats": stats, "gate": gate}


async def main(args: argparse.Namespace) -> None:
    models = args.models.split(",")
    tally = Tally()
    fakes = []
    for _ in range(args.count):
        residency = Residency(
            max_loaded_models=args.max_loaded,
            num_parallel=args.parallel,
            default_load=args.load,
            job=args.job,
        )
        fake = Counted(models=list(models), residency=residency, tokens=1)
        fake.tally = tally
        await fake.start()
        fakes.append(fake)
    try:
        ports = [f.port for f in fakes]
        await rpc.serve(
            control(fakes, tally), {"ports": ports, "port": ports[0], "pid": os.getpid()}
        )
    finally:
        for fake in fakes:
            await fake.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1, help="how many servers")
    parser.add_argument("--models", default="llama3:70b,llama3.2:1b")
    parser.add_argument("--load", type=float, default=0.6, help="seconds to load any model")
    parser.add_argument("--job", type=float, default=0.1, help="seconds of work per request")
    parser.add_argument("--max-loaded", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    raise_nofile_limit()
    parsed = parser.parse_args()
    run(main(parsed), parsed.loop)
