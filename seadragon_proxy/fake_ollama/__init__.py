"""A fake Ollama that speaks the wire format faithfully, for tests, benchmarks and demos.

Run it alone with ``python -m seadragon_proxy.fake_ollama --port 11434`` to try the
proxy without a GPU. Tests steer it through the prompt (or last message):

    gate:NAME          wait for ``fake.gate(NAME).set()`` before answering (no headers yet)
    gate-headers:NAME  send the headers, then wait for the gate before the first chunk
    gate-mid:NAME      send the headers and two chunks, then wait for the gate
    fault:error-line   two chunks, then ``{"error": ...}`` and the end, as Ollama does
    fault:hangup       two chunks, then the connection is cut
    fault:500          a plain-text 500, as a crashing Go handler would send
    fault:status:NNN   a JSON error with that status
    fault:never        headers never come (until the client gives up)
    fault:slow:N       stream one byte every 1/N seconds

``options.num_predict`` sets how many tokens a generation streams (default 5).
``parallel=N`` makes inference requests take turns N at a time inside the fake, as
Ollama's ``OLLAMA_NUM_PARALLEL`` does: the baseline a direct client sees.
``residency=Residency(...)`` (``residency.py``) loads, evicts and schedules models as
Ollama's ``server/sched.go`` does, reloading a model whose runner options (``num_ctx``
...) change; ``fake.residency.loads`` counts the loads, ``reloads`` the reloads.
Every request is recorded in ``fake.requests``; ``await fake.wait_for(n)`` waits until
n inference requests have arrived, without sleeping.
"""

from .core import SEEN, Seen
from .fake import FakeOllama
from .residency import Residency
from .wire import INFERENCE, MODELS, RUNNER_ERROR, VERSION, go_json

__all__ = [
    "INFERENCE",
    "MODELS",
    "RUNNER_ERROR",
    "SEEN",
    "VERSION",
    "FakeOllama",
    "Residency",
    "Seen",
    "go_json",
]
