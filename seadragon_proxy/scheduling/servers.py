"""The Ollama servers as the scheduler sees them: slots, what is loaded, what a load costs.

A ``Server`` knows nothing of HTTP. The glue tells it what Ollama reported (``/api/ps``,
``/api/tags``, ``load_duration``) and whether it answers; the scheduler asks it where a
waiter fits (``placement``) and tells it what was started and finished there.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Iterator

from .names import model_key
from .ticket import Ticket

SWAP_EWMA = 0.3  # weight of the newest load_duration in the learned swap cost


def canonical(model: str) -> str:
    """Ollama's full name: ``llama3`` is ``llama3:latest`` (as /api/ps and /api/tags say)."""
    return model if ":" in model else f"{model}:latest"


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"  # unreachable, its waiters wait (or go elsewhere) up to unreachable_wait
    FAILING = "failing"  # unreachable for longer: used only as a last resort, to fail fast


class Fit(enum.IntEnum):
    """How well a waiter fits a server with a free slot; lower is better."""

    LOADED = 0  # its model is loaded there
    ROOM = 1  # it can be loaded without evicting anything
    EVICT_IDLE = 2  # loading it evicts a model nobody is using
    EVICT_BUSY = 3  # loading it would evict a model with requests in flight: wait instead


class Server:
    """One Ollama server: at most ``slots`` requests in flight, at most ``max_loaded``
    models resident (0 = the proxy does not predict evictions)."""

    def __init__(
        self,
        name: str,
        slots: int,
        *,
        max_loaded: int = 0,
        models: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.slots = slots
        self.max_loaded = max_loaded
        self.patterns = tuple(models)
        self.health = Health.UP
        self.known: frozenset[str] | None = None  # its /api/tags, once read
        self._known_keys: frozenset[str] = frozenset()  # the same, as Ollama matches names
        self.running: dict[Ticket, None] = {}
        self.busy: dict[str, int] = {}  # model -> requests in flight (absent: none)
        self.loaded: dict[str, float] = {}  # model -> last used (scheduler clock)
        self.loaded_at: dict[str, float] = {}  # model -> when this proxy saw it load
        self.swap_cost: dict[str, float] = {}  # model -> learned load time, seconds
        self.swaps = 0

    def __repr__(self) -> str:
        return (
            f"<Server {self.name} {self.health.value} {len(self.running)}/{self.slots} "
            f"loaded={list(self.loaded)}>"
        )

    # -- what it may serve ----------------------------------------------------------------

    def allows(self, model: str | None) -> bool:
        """May this server serve ``model``: its ``models`` globs, and its /api/tags if known."""
        if not self.permits(model):
            return False
        if model is None or self.known is None or model in self.known:
            return True
        if canonical(model) in self.known:
            return True
        key = model_key(model)  # as Ollama finds it: defaults filled in, case ignored
        return key is None or key in self._known_keys  # a name read in doubt goes through

    def permits(self, model: str | None) -> bool:
        """Do its ``models`` globs let it serve ``model`` (whatever it has now)?"""
        if model is None or not self.patterns:
            return True
        name = canonical(model)
        return any(
            fnmatch.fnmatchcase(model, p) or fnmatch.fnmatchcase(name, p) for p in self.patterns
        )

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    def has_loaded(self, model: str | None) -> bool:
        return model is None or canonical(model) in self.loaded

    def loaded_names(self) -> set[str]:
        """The loaded models as a client may name them (``llama3`` for ``llama3:latest``)."""
        names = set(self.loaded)
        names.update(m.removesuffix(":latest") for m in self.loaded if m.endswith(":latest"))
        return names

    def fit(self, model: str | None) -> Fit:
        if model is None:
            return Fit.LOADED
        model = canonical(model)
        if model in self.loaded:
            return Fit.LOADED
        if not self.max_loaded or len(self.loaded) < self.max_loaded:
            return Fit.ROOM
        if any(m not in self.busy for m in self.loaded):
            return Fit.EVICT_IDLE
        return Fit.EVICT_BUSY

    def victim(self) -> str | None:
        """The model a load would evict now: the least recently used idle one, if full."""
        if not self.max_loaded or len(self.loaded) < self.max_loaded:
            return None
        idle = [(used, m) for m, used in self.loaded.items() if m not in self.busy]
        return min(idle)[1] if idle else None

    def cost(self, model: str) -> float | None:
        return self.swap_cost.get(canonical(model))

    # -- what happened there ----------------------------------------------------------------

    def start(self, ticket: Ticket, now: float) -> bool:
        """``ticket`` runs here from now; returns whether that loads its model (a swap)."""
        self.running[ticket] = None
        if ticket.model is None:
            return False
        model = canonical(ticket.model)
        swapped = model not in self.loaded
        if swapped:
            evicted = self.victim()
            if evicted is not None:
                self.loaded.pop(evicted, None)
                self.loaded_at.pop(evicted, None)
            self.loaded_at[model] = now
            self.swaps += 1
        self.loaded[model] = now
        self.busy[model] = self.busy.get(model, 0) + 1
        return swapped

    def finish(self, ticket: Ticket, now: float) -> None:
        self.running.pop(ticket, None)
        if ticket.model is None:
            return
        model = canonical(ticket.model)
        count = self.busy.get(model, 0) - 1
        if count > 0:
            self.busy[model] = count
        else:
            self.busy.pop(model, None)
        if model in self.loaded:
            self.loaded[model] = now

    def learn_load(self, model: str, seconds: float) -> None:
        """A load of ``model`` here took ``seconds`` (Ollama's load_duration): an EWMA."""
        model = canonical(model)
        old = self.swap_cost.get(model)
        self.swap_cost[model] = (
            seconds if old is None else (1 - SWAP_EWMA) * old + SWAP_EWMA * seconds
        )

    def observe_loaded(self, models: Iterable[str], now: float) -> None:
        """What Ollama says is loaded (``/api/ps``); models in flight here stay loaded."""
        seen = {canonical(m) for m in models} | set(self.busy)
        for model in list(self.loaded):
            if model not in seen:
                del self.loaded[model]
                self.loaded_at.pop(model, None)
        for model in seen:
            self.loaded.setdefault(model, now)

    def observe_known(self, models: Iterable[str] | None) -> None:
        """The models Ollama has (``/api/tags``); ``None`` = not known (all allowed)."""
        self.known = None if models is None else frozenset(models)
        keys = (model_key(m) for m in self.known or ())
        self._known_keys = frozenset(k for k in keys if k is not None)


def servers_view(servers: Iterable[Server]) -> Iterator[dict[str, object]]:
    """Per server, for the queue view: slots, in flight, loaded models, swap costs."""
    for s in servers:
        yield {
            "name": s.name,
            "health": s.health.value,
            "slots": s.slots,
            "in_flight": len(s.running),
            "max_loaded_models": s.max_loaded or None,
            "loaded": sorted(s.loaded),
            "swap_cost": {m: round(c, 3) for m, c in sorted(s.swap_cost.items())},
            "swaps": s.swaps,
        }
