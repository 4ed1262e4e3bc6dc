"""How long each real client waits for response headers before it gives up, and whether it
tries again: what a request queued behind a long generation meets.

A server on loopback accepts each request and never answers (as the proxy, holding a queued
request, sends nothing). Each client, with its default settings, asks it once; the server
notes every connection it gets from that client (opened, closed), the client process notes
how it ended. Run it from the repository (``make node`` first):

    .venv/bin/python scripts/client_patience.py            # about 11 minutes
    .venv/bin/python scripts/client_patience.py --limit 40 # only the short ones
    .venv/bin/python scripts/client_patience.py --frameworks /path/to/python --only litellm

The figures are written to docs/cookbook.md by hand; a client still waiting at ``--limit``
is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
MODEL = "llama3:70b"

NODE_OLLAMA = """
import { Ollama } from "ollama";
const o = new Ollama({ host: process.argv[1] });
await o.chat({ model: "MODEL", messages: [{ role: "user", content: "hi" }] });
""".replace("MODEL", MODEL)
NODE_OPENAI = """
import OpenAI from "openai";
const c = new OpenAI({ baseURL: process.argv[1] + "/v1", apiKey: "x" });
await c.chat.completions.create({ model: "MODEL", messages: [{ role: "user", content: "hi" }] });
""".replace("MODEL", MODEL)
PY_OLLAMA = """
import sys, ollama
ollama.Client(host=sys.argv[1]).chat(model="MODEL", messages=[{"role": "user", "content": "hi"}])
""".replace("MODEL", MODEL)
PY_OPENAI = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="x")
c.chat.completions.create(model="MODEL", messages=[{"role": "user", "content": "hi"}])
""".replace("MODEL", MODEL)

PY_LANGCHAIN = """
import sys
from langchain_ollama import ChatOllama
ChatOllama(model="MODEL", base_url=sys.argv[1]).invoke("hi")
""".replace("MODEL", MODEL)
PY_LLAMA_INDEX = """
import sys
from llama_index.llms.ollama import Ollama
Ollama(model="MODEL", base_url=sys.argv[1]).complete("hi")
""".replace("MODEL", MODEL)
PY_LITELLM = """
import sys, litellm
litellm.completion(
    model="ollama_chat/MODEL", api_base=sys.argv[1], messages=[{"role": "user", "content": "hi"}]
)
""".replace("MODEL", MODEL)


def clients(frameworks: str | None) -> dict[str, list[str]]:
    """The clients to ask; ``frameworks``: a Python that has langchain-ollama,
    llama-index-llms-ollama and litellm (not the project's dependencies) adds those."""
    found = {
        "ollama-js": ["node", "--input-type=module", "-e", NODE_OLLAMA],
        "openai-js": ["node", "--input-type=module", "-e", NODE_OPENAI],
        "ollama-python": [sys.executable, "-c", PY_OLLAMA],
        "openai-python": [sys.executable, "-c", PY_OPENAI],
    }
    if frameworks:
        found["langchain-ollama"] = [frameworks, "-c", PY_LANGCHAIN]
        found["llama-index"] = [frameworks, "-c", PY_LLAMA_INDEX]
        found["litellm"] = [frameworks, "-c", PY_LITELLM]
    return found


@dataclass
class Seen:
    connections: list[list[float | None]] = field(default_factory=list)  # [opened, closed]
    ended: float | None = None
    error: str = ""


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=660, help="seconds to wait at most")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--frameworks",
        metavar="PYTHON",
        help="a Python that has langchain-ollama, llama-index and litellm",
    )
    parser.add_argument("--only", metavar="NAMES", help="comma-separated client names")
    args = parser.parse_args()
    chosen = clients(args.frameworks)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    seen = {name: Seen() for name in chosen}
    start = time.monotonic()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        name = head.split(b" ", 2)[1].decode().split("/")[1]
        record = [time.monotonic() - start, None]
        seen[name].connections.append(record)
        while await reader.read(65536):  # the body, then nothing: wait for the hang-up
            pass
        record[1] = time.monotonic() - start
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def run(name: str, argv: list[str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, f"http://127.0.0.1:{port}/{name}", cwd=NODE_DIR,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(proc.communicate(), args.limit)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            seen[name].error = f"still waiting after {args.limit:g} s"
            return
        seen[name].ended = time.monotonic() - start
        lines = [line for line in err.decode().splitlines() if line.strip()]
        errors = [line.strip() for line in lines if "Error" in line]
        seen[name].error = (errors or lines or [""])[-1][:160]

    async with server:
        await asyncio.gather(*(run(name, argv) for name, argv in chosen.items()))
    if args.json:
        print(json.dumps({k: v.__dict__ for k, v in seen.items()}, indent=2))
        return 0
    for name, s in seen.items():
        tries = ", ".join(
            f"{o:.1f}-{'open' if c is None else f'{c:.1f}'}" for o, c in s.connections
        )
        ended = "-" if s.ended is None else f"{s.ended:.1f} s"
        print(f"{name:<14} attempts {len(s.connections)} [{tries}]  gave up at {ended}: {s.error}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
