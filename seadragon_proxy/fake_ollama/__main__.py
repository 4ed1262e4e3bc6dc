"""``python -m seadragon_proxy.fake_ollama``: a fake Ollama to try the proxy without a GPU."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .fake import FakeOllama
from .residency import Residency


def _load_cost(text: str) -> tuple[str, float]:
    model, sep, seconds = text.rpartition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL=SECONDS, got {text!r}")
    try:
        return model, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {seconds!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Ollama for trying seadragon-proxy.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per generation")
    group = parser.add_argument_group(
        "residency", "models load, evict and take turns as in Ollama's scheduler (opt-in)"
    )
    group.add_argument("--residency", action="store_true", help="turn the residency on")
    group.add_argument("--max-loaded-models", type=int, default=1, metavar="N")
    group.add_argument("--num-parallel", type=int, default=1, metavar="N")
    group.add_argument(
        "--load-cost",
        type=_load_cost,
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="seconds to load MODEL (repeatable)",
    )
    group.add_argument("--default-load", type=float, default=0.0, metavar="SECONDS")
    group.add_argument("--job", type=float, default=0.0, metavar="SECONDS", help="work per request")
    group.add_argument(
        "--context-length",
        type=int,
        default=4096,
        metavar="N",
        help="num_ctx of a request that sets none (OLLAMA_CONTEXT_LENGTH)",
    )
    group.add_argument(
        "--fast-path",
        action="store_true",
        help="a loaded model that needs no reload skips Ollama's queue (Ollama 0.11.5+)",
    )
    args = parser.parse_args()
    residency = None
    if args.residency:
        try:
            residency = Residency(
                max_loaded_models=args.max_loaded_models,
                num_parallel=args.num_parallel,
                load_cost=dict(args.load_cost),
                default_load=args.default_load,
                job=args.job,
                context_length=args.context_length,
                fast_path=args.fast_path,
            )
        except ValueError as e:
            parser.error(str(e))

    async def run() -> None:
        fake = FakeOllama(tokens=args.tokens, residency=residency)
        await fake.start(args.port, args.host)
        print(f"fake Ollama listening on http://{args.host}:{fake.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


main()
