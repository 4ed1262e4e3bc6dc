"""Who goes next, and where: the queue in front of the Ollama slots. No aiohttp here.

- ``ticket.py``    one request's place in line
- ``levels.py``    the waiters of one priority level, in the order that level serves them
- ``fairness.py``  a level shared fairly between tenants (the Virtual Token Counter)
- ``scheduler.py`` the slots; the levels compared by (aged) priority; the next one woken
"""

from .fairness import FairLevel
from .levels import FifoLevel, LevelQueue
from .scheduler import Listener, Scheduler, Slot
from .ticket import State, Ticket

__all__ = [
    "FairLevel",
    "FifoLevel",
    "LevelQueue",
    "Listener",
    "Scheduler",
    "Slot",
    "State",
    "Ticket",
]
