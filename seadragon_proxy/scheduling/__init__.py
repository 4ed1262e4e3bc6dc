"""Who goes next, and where: the queue in front of the Ollama servers. No aiohttp here.

- ``ticket.py``    one request's place in line
- ``levels.py``    the waiters of one priority level, in the order that level serves them
- ``servers.py``   one Ollama server: slots, loaded models, learned swap costs, health
- ``names.py``     model names as Ollama matches them (``llama3`` is ``llama3:latest``)
- ``fairness.py``  a level shared fairly between tenants (the Virtual Token Counter)
- ``scheduler.py`` the levels compared by (aged) priority, affinity, the dispatch loop
"""

from .fairness import FairLevel
from .levels import FifoLevel, LevelQueue
from .scheduler import Affinity, LevelFactory, Listener, Scheduler, Slot
from .servers import Fit, Health, Server, servers_view
from .ticket import Place, State, Ticket

__all__ = [
    "Affinity",
    "FairLevel",
    "FifoLevel",
    "Fit",
    "Health",
    "LevelFactory",
    "LevelQueue",
    "Listener",
    "Place",
    "Scheduler",
    "Server",
    "Slot",
    "State",
    "Ticket",
    "servers_view",
]
