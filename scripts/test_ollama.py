#!/usr/bin/env python3
"""Smoke test through seadragon-proxy with the real ``ollama`` client: list the models, then
stream a chat. ``.venv/bin/python scripts/test_ollama.py [--host URL] [--model M]``;
exit 0 when both work, 1 with a sentence saying what failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ollama import Client, ResponseError

DEFAULT_HOST = "http://127.0.0.1:11435"  # the proxy, not Ollama itself


def safe(text: str) -> str:
    """Model output and server messages with control characters escaped (newlines kept)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("OLLAMA_HOST") or DEFAULT_HOST,
        help=f"the proxy's address (default: $OLLAMA_HOST, else {DEFAULT_HOST})",
    )
    parser.add_argument("--model", default="llama3:70b", help="model to chat with")
    parser.add_argument("--prompt", default="Why is the sky blue? Answer in one sentence.")
    parser.add_argument("--timeout", type=float, default=300, help="seconds (a load is slow)")
    args = parser.parse_args(argv)
    client = Client(host=args.host, timeout=args.timeout)
    try:
        names = [m.model or "?" for m in client.list().models]
    except ResponseError as e:
        print(f"✗ list at {args.host}: HTTP {e.status_code}: {safe(e.error)}", file=sys.stderr)
        return 1
    except Exception as e:  # ConnectionError, httpx timeouts: a sentence, not a traceback
        print(f"✗ list at {args.host}: {safe(str(e))}", file=sys.stderr)
        return 1
    print(f"✓ {len(names)} models at {args.host}: {safe(', '.join(names))}")
    if args.model not in names and f"{args.model}:latest" not in names:
        print(
            f"✗ {args.model} is not among them; pull it: OLLAMA_HOST={args.host} "
            f"ollama pull {args.model}",
            file=sys.stderr,
        )
        return 1
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        stream = client.chat(
            model=args.model, messages=[{"role": "user", "content": args.prompt}], stream=True
        )
        for part in stream:
            if first is None:
                first = time.perf_counter() - started
            print(safe(part.message.content or ""), end="", flush=True)
            if part.done:
                tokens = part.eval_count or 0
    except ResponseError as e:
        print(f"\n✗ chat with {args.model}: {safe(e.error)}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"\n✗ chat with {args.model}: {safe(str(e))}", file=sys.stderr)
        return 1
    took = time.perf_counter() - started
    print(f"\n✓ chat streamed {tokens} tokens in {took:.2f} s (first after {first or 0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
