"""Arrays a process keeps for its next call on the same input, within a budget of bytes."""
from collections import OrderedDict


class ArrayCache:
    """Read-only numpy arrays by key, up to `max_bytes` in all; the least recently used go
    first (the one just put stays, whatever its size)."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._arrays = OrderedDict()

    def get(self, key):
        """The array kept under `key`, or None."""
        if key not in self._arrays:
            return None
        self._arrays.move_to_end(key)
        return self._arrays[key]

    def put(self, key, array):
        """Keep `array` (made read-only) under `key`; returns it."""
        array.setflags(write=False)
        self._arrays[key] = array
        while sum(a.nbytes for a in self._arrays.values()) > self.max_bytes and \
                len(self._arrays) > 1:
            self._arrays.popitem(last=False)
        return array

    def clear(self):
        self._arrays.clear()
