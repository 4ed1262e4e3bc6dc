"""What the fleet scenarios (7-9) share: fakes with residency, the proxy's fleet config as
the contract writes it, and the check that this build accepts it.

These scenarios start their own processes (the fakes must load models, which the shared
fake of scenarios 1-6 does not) and stop them when done.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .children import ROOT, Child, proxy_config, start_python_child
from .client import BenchError

A, B = "llama3:70b", "llama3.2:1b"
LOAD = 0.6  # seconds to load a model, as the scenarios have it
JOB = 0.1  # seconds of work per request
NEEDS_FLEET = "needs the fleet"
# Reorder within a level only (batch and coding are different levels), defer at most 30 s.
AFFINITY: dict[str, float] = {"window": 0, "max_defer": 30, "min_residency": 0}


async def start_resident(
    workdir: Path,
    name: str,
    *,
    count: int = 1,
    load: float = LOAD,
    job: float = JOB,
    models: tuple[str, ...] = (A, B),
    max_loaded: int = 1,
) -> Child:
    _ensure(workdir)  # the harness, not a request path: a mkdir is fine here
    args = ["bench.residency_child", "--count", str(count), "--load", str(load)]
    args += ["--job", str(job), "--models", ",".join(models), "--max-loaded", str(max_loaded)]
    return await start_python_child(name, args, workdir)


def _ensure(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)


def ports(child: Child) -> list[int]:
    return [int(p) for p in child.ready["ports"]]


def strict_config(workdir: Path, url: str) -> dict[str, Any]:
    """Part 1: one ``upstream:``, strict priority (the proxy as it is without a fleet)."""
    return proxy_config(workdir, url)


def fleet_config(
    workdir: Path,
    urls: list[str],
    *,
    max_loaded: int = 1,
    affinity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The contract's ``upstreams:`` (one slot each) and, if given, ``queue.affinity``."""
    config = proxy_config(workdir, urls[0])
    del config["upstream"]  # only the contract's keys: name, url, slots, max_loaded_models
    config["upstreams"] = [
        {"name": f"gpu-{i}", "url": url, "slots": 1, "max_loaded_models": max_loaded}
        for i, url in enumerate(urls)
    ]
    if affinity is not None:
        config["queue"]["affinity"] = affinity
    return config


def _write(workdir: Path, name: str, config: dict[str, Any]) -> Path:
    _ensure(workdir)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def refusal(workdir: Path, name: str, config: dict[str, Any]) -> str | None:
    """None if ``seadragon-proxy check`` accepts ``config``, else what it said."""
    path = _write(workdir, name, config)
    check = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "seadragon_proxy",
        "check",
        "--config",
        str(path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    output, _ = await check.communicate()
    if check.returncode == 0:
        return None
    lines = output.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {check.returncode}"


def skipped(scenario: str, front: str, why: str) -> None:
    print(f"[bench] scenario {scenario}: {front} skipped, {NEEDS_FLEET} ({why})", file=sys.stderr)


async def start_front(workdir: Path, name: str, config: dict[str, Any]) -> Child:
    path = _write(workdir, name, config)
    return await start_python_child(name, ["bench.proxy_child", str(path)], workdir)


def body(model: str, prompt: str) -> bytes:
    doc = {"model": model, "prompt": prompt, "stream": False, "options": {"num_predict": 1}}
    return json.dumps(doc).encode()


@dataclass
class Sent:
    """One request as the load generator saw it (perf_counter stamps, one clock for all)."""

    prompt: str
    model: str
    source: str
    sent: float = 0.0
    done: float = 0.0


async def send(s: aiohttp.ClientSession, url: str, job: Sent) -> Sent:
    headers = {"Content-Type": "application/json", "X-Test-Source": job.source}
    job.sent = time.perf_counter()
    async with s.post(
        url + "/api/generate", data=body(job.model, job.prompt), headers=headers
    ) as r:
        answer = await r.read()
        if r.status != 200:
            raise BenchError(f"{url} answered {r.status}: {answer[:200]!r}")
    job.done = time.perf_counter()
    return job


async def stats(resident: Child) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await resident.control().call("stats", 30)
    return result


def loads(servers: list[dict[str, Any]]) -> int:
    return sum(sum(s["loads"].values()) for s in servers)
