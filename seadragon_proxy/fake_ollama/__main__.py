"""``python -m seadragon_proxy.fake_ollama``: a fake Ollama to try the proxy without a GPU."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .fake import FakeOllama


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Ollama for trying seadragon-proxy.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per generation")
    args = parser.parse_args()

    async def run() -> None:
        fake = FakeOllama(tokens=args.tokens)
        await fake.start(args.port, args.host)
        print(f"fake Ollama listening on http://{args.host}:{fake.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


main()
