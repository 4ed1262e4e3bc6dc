"""Who goes next, and where: the queue in front of the Ollama slots. No aiohttp here.

- ``ticket.py``    one request's place in line
- ``levels.py``    the waiters of one priority level, in the order that level serves them
- ``scheduler.py`` the slots; the levels compared by (aged) priority; the next one woken
"""

from .levels import FifoLevel, LevelQueue
from .scheduler import Listener, Scheduler, Slot
from .ticket import Place, State, Ticket

__all__ = ["FifoLevel", "LevelQueue", "Listener", "Place", "Scheduler", "Slot", "State", "Ticket"]
