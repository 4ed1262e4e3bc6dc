"""``scripts/test_ollama.py``, the seed's smoke test, run as a user runs it: a child process
with the real ``ollama`` client, against the running proxy."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .conftest import MODEL, Proxy, free_port

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test_ollama.py"


async def smoke(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_lists_and_streams_a_chat_through_the_proxy(proxy: Proxy) -> None:
    code, out, err = await smoke("--host", proxy.url, "--model", MODEL)
    assert code == 0, err
    assert f"✓ 3 models at {proxy.url}: {MODEL}, llama3.2:1b, nomic-embed-text:latest" in out
    assert "✓ chat streamed 5 tokens in " in out
    chat = [r for r in proxy.forwarded if r.path == "/api/chat"]
    assert len(chat) == 1 and chat[0].headers["User-Agent"].startswith("ollama-python/")
    assert [r.path for r in proxy.forwarded] == ["/api/tags", "/api/chat"]  # via the proxy
    records = await proxy.records(2)
    assert [r.route for r in records] == ["/api/tags", "/api/chat"]


async def test_a_missing_model_says_how_to_pull_it(proxy: Proxy) -> None:
    model = "mistral:7b"
    code, _, err = await smoke("--host", proxy.url, "--model", model)
    assert code == 1 and "Traceback" not in err
    assert f"✗ {model} is not among them; pull it: OLLAMA_HOST={proxy.url} ollama pull" in err


async def test_no_proxy_is_a_sentence_not_a_traceback() -> None:
    host = f"http://127.0.0.1:{free_port()}"
    code, _, err = await smoke("--host", host)
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"✗ list at {host}: ")
