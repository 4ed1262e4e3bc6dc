"""The drop-in proof: the real ``ollama`` and ``openai`` packages, unchanged, through the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import ollama
import openai
import pytest

from .conftest import MODEL, Proxy


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=proxy.url)
    yield c
    await c._client.aclose()


@pytest.fixture
async def oai(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ollama", max_retries=0)
    yield c
    await c.close()


async def test_list_show_and_ps(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert MODEL in [m.model for m in listed.models]
    shown = await client.show(MODEL)
    assert shown.details is not None and shown.details.family == "llama"
    running = await client.ps()
    assert running.models[0].size_vram


async def test_generate_streamed_and_not(client: ollama.AsyncClient, proxy: Proxy) -> None:
    parts = [
        part async for part in await client.generate(MODEL, "why is the sky blue?", stream=True)
    ]
    assert "".join(p.response for p in parts) == "The sky is blue because"
    assert parts[-1].done and parts[-1].eval_count == 5
    whole = await client.generate(MODEL, "again", stream=False)
    assert whole.response == "The sky is blue because" and whole.done_reason == "stop"
    assert proxy.fake.inference[0].headers["User-Agent"].startswith("ollama-python/")


async def test_chat_streamed_and_not(client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hello"}]
    parts = [p async for p in await client.chat(MODEL, messages=messages, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "The sky is blue because"
    whole = await client.chat(MODEL, messages=messages, options={"num_predict": 2})
    assert whole.message.content == "The sky" and whole.eval_count == 2


async def test_preload_and_unload_like_ollama_run_and_stop(client: ollama.AsyncClient) -> None:
    loaded = await client.generate(MODEL)
    assert loaded.done_reason == "load"
    unloaded = await client.generate(MODEL, keep_alive=0)
    assert unloaded.done_reason == "unload"


async def test_embed(client: ollama.AsyncClient) -> None:
    result = await client.embed(MODEL, input=["a", "b"])
    assert len(result.embeddings) == 2
    legacy = await client.embeddings(MODEL, prompt="a")
    assert list(legacy.embedding) == [0.1, 0.2, 0.3]


async def test_pull_progress_and_delete(client: ollama.AsyncClient) -> None:
    statuses = [p.status async for p in await client.pull("llama3.2:1b", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert (await client.pull("llama3.2:1b")).status == "success"
    assert (await client.delete("llama3.2:1b")).status == "success"


async def test_unknown_model_is_ollamas_404(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await client.show("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'no-such-model' not found"


async def test_error_line_mid_stream_reaches_the_client(client: ollama.AsyncClient) -> None:
    """Ollama's own mid-stream error line passes through; the client raises on it."""
    stream = await client.generate(MODEL, "fault:error-line", stream=True)
    received = []
    with pytest.raises(ollama.ResponseError) as caught:
        async for part in stream:
            received.append(part.response)
    assert received == ["The", " sky"]
    assert "unexpected EOF" in caught.value.error
    assert caught.value.status_code == -1


async def test_upstream_hangup_mid_stream_becomes_one_error_line(
    client: ollama.AsyncClient,
) -> None:
    stream = await client.chat(
        MODEL, messages=[{"role": "user", "content": "fault:hangup"}], stream=True
    )
    with pytest.raises(ollama.ResponseError) as caught:
        async for _ in stream:
            pass
    assert "closed the connection before the answer was complete" in caught.value.error


async def test_openai_streamed_chat(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "The sky is blue because"
    assert usage is not None and usage.completion_tokens == 5


async def test_openai_non_streamed_models_and_embeddings(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert completion.choices[0].message.content == "The sky is"
    models = await oai.models.list()
    assert MODEL in [m.id for m in models.data]
    embedding = await oai.embeddings.create(model=MODEL, input="a")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]


async def test_openai_errors_come_in_openai_shape(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
