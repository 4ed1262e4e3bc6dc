"""Several proxy processes, one queue: the Redis backend (``queue.backend: redis``).

- ``link.py``  this replica's connection to Redis: keys under the prefix, one pub/sub
  listener that pushes every message to its handlers, up/down with the reason, and
  reconnection with back-off while Redis is away
"""
