"""Which models the fake has loaded, scheduled as Ollama's ``server/sched.go`` does.

Opt-in: ``FakeOllama(residency=Residency(...))``. Without it the fake answers at once, as
it always did. With it, every inference request goes through one scheduler:

- Requests are scheduled one at a time in arrival order (``processPending``): while the
  head request loads a model, or waits for a model to be evicted, every request behind
  it waits too, even one for a model that is loaded (head-of-line, as Ollama did before
  0.11.5). ``fast_path=True`` is Ollama 0.11.5 and later (``GetRunner``, commit d5a0d8d):
  a request for a loaded model that needs no reload takes it at once, past the line, even
  while that model is marked to be evicted or reloaded — so the waiting request waits for
  it too, and a ``keep_alive`` it carries cancels the mark (the waiter then waits for
  that keep-alive to run out).
- A loaded model has ``num_parallel`` slots; requests beyond them wait in FIFO order (the
  runner's semaphore).
- At most ``max_loaded_models`` are loaded. A new model evicts one (``findRunnerToUnload``:
  the shortest keep-alive first, an idle one if any): an idle model at once, a busy one
  only after its requests finish.
- Loading costs ``load_cost[model]`` (else ``default_load``) seconds of simulated work; the
  request that loaded the model reports it as ``load_duration`` (ns), others about 0.
- ``keep_alive`` (seconds or a Go duration; negative = forever; default 5 minutes) is
  honoured: after the last request of a model ends it stays that long, 0 unloads it at
  once. ``/api/ps`` lists what is loaded with ``expires_at`` and ``size_vram``.
- A loaded model keeps the runner options it was loaded with (``RunnerOptions``:
  ``num_ctx``, ``num_batch``, ``num_gpu``, ``main_gpu``, ``use_mmap``, ``num_thread``; an
  unset one is Ollama's default, ``num_ctx`` is ``context_length``). A request whose
  options differ reloads it (``needsReload``): it waits, as for an eviction, until the
  model's requests finish, then unloads and loads it again — a load like any other.
  ``num_gpu`` unset (or negative) never causes a reload.
- ``job`` seconds of simulated work per request (0 = none), while holding its slot.
- ``loads`` counts loads per model (reloads included), ``reloads`` the reloads,
  ``unloads`` the unloads (a reload's too), ``load_log`` the span of each load,
  ``running``/``max_running`` the requests holding a slot: for tests and the bench.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

FOREVER = None  # a keep-alive that never expires (Ollama: any negative duration)
DEFAULT_KEEP_ALIVE = 300.0  # OLLAMA_KEEP_ALIVE's default, 5m
DEFAULT_CONTEXT_LENGTH = 4096  # OLLAMA_CONTEXT_LENGTH's default (0.12)
WARM_LOAD_NS = 1_000_000  # load_duration of a request whose model was already loaded
_MAX_DURATION_DAYS = 106_751  # Go's math.MaxInt64 nanoseconds, what "forever" shows as
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class BadKeepAlive(ValueError):
    """A ``keep_alive`` Ollama would refuse; the message is Go's."""


class BadOption(ValueError):
    """A runner option of the wrong type; the message is Go's (``Options.FromMap``)."""


_INTEGER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread")


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """The options a runner is started with (Ollama's ``api.Runner``), unset ones filled
    with ``DefaultOptions()``: changing any of them means loading the model again."""

    num_ctx: int = DEFAULT_CONTEXT_LENGTH
    num_batch: int = 512
    num_gpu: int = -1  # -1: as many layers as fit, decided at load
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0  # 0: the runtime decides

    @classmethod
    def from_request(
        cls, options: dict[str, Any] | None, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> RunnerOptions:
        """Read a request's ``options`` as ``FromMap`` over the defaults does: a JSON number
        is truncated to an integer, ``null`` leaves the default, a wrong type is refused;
        other keys (sampling options, unknown ones) do not concern the runner."""
        values: dict[str, Any] = {"num_ctx": context_length}
        for key, value in (options or {}).items():
            if value is None or key not in (*_INTEGER_OPTIONS, "use_mmap"):
                continue
            if key == "use_mmap":
                if not isinstance(value, bool):
                    raise BadOption(f'option "{key}" must be of type boolean')
                values[key] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                values[key] = int(value)
            else:
                raise BadOption(f'option "{key}" must be of type integer')
        values["num_ctx"] = max(4, values["num_ctx"])  # GetRunner's floor
        return cls(**values)

    def needs_reload(self, wanted: RunnerOptions) -> bool:
        """``needsReload``: any difference, except that a request leaving ``num_gpu`` to
        Ollama (negative) takes the runner whatever layers it was loaded with."""
        if wanted.num_gpu < 0:
            return replace(self, num_gpu=-1) != replace(wanted, num_gpu=-1)
        return self != wanted


def parse_keep_alive(value: object) -> float | None:
    """Seconds, or ``None`` for forever, as Ollama's ``api.Duration`` reads it."""
    if isinstance(value, bool):
        raise BadKeepAlive(f"json: cannot unmarshal bool into Go value of type {value!r}")
    if isinstance(value, int | float):
        return FOREVER if value < 0 else float(value)
    if not isinstance(value, str):
        raise BadKeepAlive("json: cannot unmarshal into Go value of type api.Duration")
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    if re.fullmatch(r"\d+(\.\d*)?|\.\d+", body):
        raise BadKeepAlive(f'time: missing unit in duration "{value}"')
    if not body or _PART.sub("", body):
        raise BadKeepAlive(f'time: invalid duration "{value}"')
    seconds = sign * sum(float(n) * _UNITS[u] for n, u in _PART.findall(body))
    return FOREVER if seconds < 0 else seconds


@dataclass
class Runner:
    """One loaded model: its slots, the requests holding it, and when it expires."""

    model: str
    slots: asyncio.Semaphore
    keep_alive: float | None
    options: RunnerOptions = field(default_factory=RunnerOptions)
    refs: int = 0  # requests given this runner and not yet finished (Ollama's refCount)
    expires_at: float | None = None  # wall-clock time.time(), set when it goes idle
    timer: asyncio.TimerHandle | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Residency:
    max_loaded_models: int = 1
    num_parallel: int = 1
    load_cost: dict[str, float] = field(default_factory=dict)
    default_load: float = 0.0
    job: float = 0.0
    keep_alive: float | None = DEFAULT_KEEP_ALIVE
    context_length: int = DEFAULT_CONTEXT_LENGTH  # OLLAMA_CONTEXT_LENGTH: num_ctx when unset
    fast_path: bool = False  # Ollama >= 0.11.5's GetRunner: a usable loaded model skips the line
    loads: Counter[str] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)
    unloads: Counter[str] = field(default_factory=Counter)
    loaded: dict[str, Runner] = field(default_factory=dict)
    load_log: list[tuple[str, float, float]] = field(default_factory=list)  # model, began, ended
    running: int = 0  # requests holding a slot now
    max_running: int = 0
    on_change: Callable[[], None] | None = None  # the fake's wake-up for ``wait_until``
    _pending: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.max_loaded_models < 1 or self.num_parallel < 1:
            raise ValueError("max_loaded_models and num_parallel must be at least 1")
        if self.default_load < 0 or self.job < 0 or any(v < 0 for v in self.load_cost.values()):
            raise ValueError("load costs and job time must not be negative")
        if self.context_length < 1:
            raise ValueError("context_length must be at least 1")

    def cost(self, model: str) -> float:
        return self.load_cost.get(model, self.default_load)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def runner_options(self, options: dict[str, Any] | None) -> RunnerOptions:
        """A request's runner options, unset ones at their defaults (raises ``BadOption``)."""
        return RunnerOptions.from_request(options, self.context_length)

    @asynccontextmanager
    async def use(
        self,
        model: str,
        keep_alive: float | str | None = "default",
        *,
        work: bool = True,
        options: RunnerOptions | None = None,
    ) -> AsyncIterator[int]:
        """Hold a slot of ``model`` (loading it if need be); yields ``load_duration`` in ns.

        ``keep_alive="default"`` means the request named none; ``work=False`` (a bare
        load request) skips the simulated ``job`` time; ``options`` (default: all unset)
        reload the model when they differ from the ones it was loaded with."""
        wanted = options if options is not None else self.runner_options(None)
        runner, load_ns = await self._schedule(model, keep_alive, wanted)
        try:
            async with runner.slots:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                self._changed()
                try:
                    if self.job and work:
                        await asyncio.sleep(self.job)  # the simulated work of the request
                    yield load_ns
                finally:
                    self.running -= 1
        finally:
            self._finished(runner)
            self._changed()

    async def _schedule(
        self, model: str, keep_alive: float | str | None, wanted: RunnerOptions
    ) -> tuple[Runner, int]:
        runner = self.loaded.get(model)
        if self.fast_path and runner is not None and not runner.options.needs_reload(wanted):
            self._take(runner, keep_alive)  # GetRunner's shortcut: past the pending queue
            return runner, WARM_LOAD_NS
        async with self._pending:  # one pending request at a time, in arrival order
            reloading = False
            while True:
                runner = self.loaded.get(model)
                if runner is not None and not runner.options.needs_reload(wanted):
                    self._take(runner, keep_alive)
                    return runner, WARM_LOAD_NS
                if runner is None and len(self.loaded) < self.max_loaded_models:
                    if reloading:
                        self.reloads[model] += 1
                    return await self._load(model, keep_alive, wanted)
                # The model itself with other options, or another model to make room for.
                victim = runner if runner is not None else self._to_unload()
                reloading = reloading or victim is runner
                victim.keep_alive = 0.0  # expire as soon as its requests finish
                if victim.refs == 0:
                    self._unload(victim)
                await victim.gone.wait()

    async def _load(
        self, model: str, keep_alive: float | str | None, options: RunnerOptions
    ) -> tuple[Runner, int]:
        began = time.perf_counter()
        await asyncio.sleep(self.cost(model))  # the simulated load
        ended = time.perf_counter()
        self.load_log.append((model, began, ended))
        load_ns = int((ended - began) * 1e9)
        ka = self.keep_alive if isinstance(keep_alive, str) else keep_alive
        runner = Runner(model, asyncio.Semaphore(self.num_parallel), ka, options, refs=1)
        self.loaded[model] = runner
        self.loads[model] += 1
        self._changed()
        return runner, max(1, load_ns)

    def _take(self, runner: Runner, keep_alive: float | str | None) -> None:
        runner.refs += 1
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if not isinstance(keep_alive, str):
            runner.keep_alive = keep_alive

    def _finished(self, runner: Runner) -> None:
        runner.refs -= 1
        if runner.refs > 0 or runner.gone.is_set():
            return
        if runner.keep_alive == 0:
            self._unload(runner)
        elif runner.keep_alive is not None:
            runner.expires_at = time.time() + runner.keep_alive
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.keep_alive, self._expire, runner)
        else:
            runner.expires_at = None

    def _expire(self, runner: Runner) -> None:
        runner.timer = None
        if runner.refs == 0:
            self._unload(runner)

    def _to_unload(self) -> Runner:
        """Ollama's ``findRunnerToUnload``: sorted by keep-alive, an idle one first."""
        runners = sorted(
            self.loaded.values(),
            key=lambda r: float("inf") if r.keep_alive is None else r.keep_alive,
        )
        return next((r for r in runners if r.refs == 0), runners[0])

    def _unload(self, runner: Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if self.loaded.get(runner.model) is runner:
            del self.loaded[runner.model]
            self.unloads[runner.model] += 1
        runner.gone.set()
        self._changed()

    def expire(self, model: str) -> None:
        """``keep_alive: 0`` with an empty prompt: unload now, or once its requests end."""
        runner = self.loaded.get(model)
        if runner is None:
            return
        runner.keep_alive = 0.0
        if runner.refs == 0:
            self._unload(runner)

    def expires_iso(self, runner: Runner) -> str:
        """``expires_at`` as ``/api/ps`` shows it (busy or loading: now + keep-alive)."""
        if runner.keep_alive is None:
            when = datetime.now(UTC) + timedelta(days=_MAX_DURATION_DAYS)
        elif runner.expires_at is None or runner.refs > 0:
            when = datetime.now(UTC) + timedelta(seconds=runner.keep_alive)
        else:
            when = datetime.fromtimestamp(runner.expires_at, UTC)
        return when.isoformat().replace("+00:00", "Z")
