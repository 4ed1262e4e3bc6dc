"""Several proxy processes, one queue: the Redis backend (``queue.backend: redis``).

- ``link.py``        this replica's connection to Redis: keys under the prefix, one pub/sub
  listener that pushes every message to its handlers, up/down with the reason, and
  reconnection with back-off while Redis is away
- ``messages.py``    what replicas and the dispatcher say to each other (pure, validated)
- ``remote.py``      ``RemoteQueue``: this replica's waiters, waiting on pushed grants
- ``dispatcher.py``  the elected replica that runs the real Scheduler for everybody
- ``replica.py``     the three together as the app holds them; the queue view from Redis
"""
