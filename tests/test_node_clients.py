"""The drop-in proof for JavaScript: ollama-js and the openai SDK from npm (tests/node, the
versions in its package-lock.json, installed by ``make node``), unchanged, through the proxy.

Node is required, not optional: a missing Node or ``npm ci`` fails these tests."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from seadragon_proxy.keys import KeyStore

from .conftest import MODEL, Proxy, ProxyFactory
from .test_queueing import block, start

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "clients.mjs"

CLASSIFIED = {
    "sources": [
        {"name": "coding", "priority": 0, "match": {"path_prefix": "/s/coding"}},
        {"name": "scripts", "priority": 8, "match": {"api_key": "team-scripts"}},
        {"name": "direct_api", "priority": 10},
    ],
    "default_source": "direct_api",
}


async def node(case: str, base_url: str, api_key: str | None = None) -> Any:
    """Run one case of clients.mjs; its stdout is one JSON object."""
    binary = shutil.which("node")
    assert binary, "node is not installed: run 'make node' (the client tests need Node 20+)"
    assert (NODE_DIR / "node_modules" / "ollama").is_dir(), "run 'make node' (npm ci in tests/node)"
    args = [str(SCRIPT), case, base_url, *([api_key] if api_key else [])]
    proc = await asyncio.create_subprocess_exec(
        binary, *args, cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(CLASSIFIED)


async def test_ollama_js_chat_stream(proxy: Proxy) -> None:
    result = await node("ollama-chat-stream", proxy.url)
    assert result == {"text": "The sky is blue because", "done": True, "eval_count": 5}
    seen = proxy.fake.inference[0]
    assert seen.path == "/api/chat" and seen.headers["User-Agent"].startswith("ollama-js/")


async def test_ollama_js_generate_list_and_embeddings(proxy: Proxy) -> None:
    assert await node("ollama-generate", proxy.url) == {"text": "The sky", "done_reason": "stop"}
    listed = await node("ollama-list", proxy.url)
    assert MODEL in listed["models"] and listed["family"] == "llama"
    assert await node("ollama-embed", proxy.url) == {"count": 2, "legacy": [0.1, 0.2, 0.3]}
    missing = await node("ollama-missing-model", proxy.url)
    assert missing["status"] == 404 and "not found" in missing["error"]


async def test_openai_js_chat_completions_stream_models_and_embeddings(proxy: Proxy) -> None:
    result = await node("openai-chat-stream", proxy.url)
    assert result["text"] == "The sky is blue because" and result["finish"] == "stop"
    assert MODEL in result["models"] and result["dims"] == 3
    assert proxy.fake.inference[0].headers["User-Agent"].startswith("OpenAI/JS")


async def test_ollama_js_under_a_path_prefix_gets_its_source(proxy: Proxy) -> None:
    """What `OLLAMA_HOST=http://gpu:11435/s/coding` does for a tool built on ollama-js."""
    await node("ollama-chat-stream", proxy.url + "/s/coding")
    records = await proxy.records(1)
    assert records[0].source == "coding" and proxy.fake.inference[0].path == "/api/chat"


async def test_openai_js_api_key_gets_its_source_and_stays_here(proxy: Proxy) -> None:
    key = await KeyStore(proxy.live.store.path).add("team-scripts")
    await proxy.live.reload_keys()
    await node("openai-chat-stream", proxy.url, key)
    chat = next(r for r in await proxy.records(1) if r.route == "/v1/chat/completions")
    assert chat.source == "scripts" and chat.api_key == "team-scripts"
    assert all("Authorization" not in s.headers for s in proxy.forwarded)


async def test_openai_js_silent_retry_after_its_timeout_keeps_its_place(proxy: Proxy) -> None:
    """openai-js gives up on a queued request (here after 3 s, by default after Node's 300 s)
    and retries on its own; the retry takes back the first attempt's place, ahead of a
    request that arrived after it."""
    blocker, gate = await block(proxy)
    js = asyncio.create_task(node("openai-retry", proxy.url))
    await proxy.watch.queued(1)
    later = await start(proxy, "later")
    await proxy.watch.queued(2)

    def retried() -> bool:
        gone = [r for r in proxy.finished if r.hung_up and r.left_queue]
        return bool(gone) and proxy.scheduler.queue_length == 2

    await proxy.watch.until(retried, timeout=30)
    assert proxy.scheduler.queued()[0].path == "/v1/chat/completions"
    gate.set()
    assert (await js)["text"] == "The sky is blue because"
    await asyncio.gather(blocker, later)
    served = [s.path for s in proxy.fake.inference[1:]]
    assert served == ["/v1/chat/completions", "/api/generate"]
    assert [r.rejoined for r in proxy.finished if r.route == "/v1/chat/completions"] == [
        False,
        True,
    ]
