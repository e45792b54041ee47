"""Where the online layer keeps per-user online states: a small pluggable interface and a bounded default.

An :class:`~recmeta_sdk.online.OnlineStore` keeps each user's latest
:class:`~recmeta_sdk.online.OnlineUser` in a *state backend*: any object with the five methods of
:class:`StateBackend` (``get``, ``put``, ``delete``, ``__len__``, ``items``). The default,
:class:`MemoryBackend`, is in-process and bounded: at most ``max_users`` entries and / or
``max_bytes`` bytes (least recently used out first) and optionally a time to live; what it evicts
or expires it counts (:meth:`MemoryBackend.stats`). A host passes its own backend (a shared cache,
a key-value service) as ``Recommender.online_store(backend=...)``; ``OnlineUser`` values pickle
without the model (a few arrays: the user's histories, its fast parameters, the two state vectors
and the sparse online item-bias correction), so a backend may serialise them.

A user whose entry is gone (evicted, expired, deleted, or never written) is served as if it had no
feedback: a training user from its training state, a new user from ``adapt([])``; its next feedback
event starts again from there. Nothing else changes: the feedback log keeps every event.

Thread safety: the online store calls a backend from several threads at once (readers without a
lock; writers of one user serialised, writers of different users in parallel), so a backend's
methods must be safe to call concurrently (:class:`MemoryBackend`'s are).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["MemoryBackend", "StateBackend"]


@runtime_checkable
class StateBackend(Protocol):
    """The interface of an online-state store's backend (keys: user ids, values: ``OnlineUser``).

    ``get`` returns the value last ``put`` for the user, or None if there is none (never written,
    deleted, evicted or expired); ``put`` replaces it; ``delete`` removes it and says whether there
    was one; ``len`` is the number of users held; ``items`` iterates ``(user, value)`` pairs (a
    snapshot or a live view; used for reporting and copying, not on the serving path). Every method
    may be called from several threads at once. An optional ``stats() -> dict`` is reported by
    ``OnlineStore.stats()``.
    """

    def get(self, user: Hashable) -> Any | None: ...

    def put(self, user: Hashable, value: Any) -> None: ...

    def delete(self, user: Hashable) -> bool: ...

    def __len__(self) -> int: ...

    def items(self) -> Iterator[tuple[Hashable, Any]]: ...


def _nbytes(value: Any) -> int:
    n = getattr(value, "nbytes", None)
    return int(n) if n is not None else 0


class MemoryBackend:
    """In-process, bounded :class:`StateBackend`: LRU by entries and / or bytes, optional TTL.

    Parameters
    ----------
    max_users : int or None, default 1_000_000
        At most this many users; putting one more evicts the least recently used (read or
        written). None: no limit on the count.
    max_bytes : int or None, default 1 GiB
        At most this many bytes of values (each value's ``nbytes``; ``OnlineUser.nbytes`` counts
        its arrays); least recently used out first. A single value larger than the whole budget
        is still kept (alone), so the latest feedback is never lost to its own size. None: no limit.
    ttl : float or None, default None
        Seconds a value lives after it was last *written*; an expired value reads as absent and
        is dropped when next read (``items`` skips it; until then, or until the LRU pushes it
        out, it still counts in ``len`` and ``nbytes``). None: no expiry.
    clock : callable, default ``time.monotonic``
        The time source of ``ttl`` (tests inject a fake clock).

    :meth:`stats` reports the entries and bytes held and the evictions and expirations so far;
    an eviction or expiry is never silent.
    """

    def __init__(self, max_users: int | None = 1_000_000, max_bytes: int | None = 1 << 30,
                 ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        for name, v in (("max_users", max_users), ("max_bytes", max_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
                                or ttl == float("inf")):
            raise ValueError(f"ttl must be a finite number of seconds > 0 or None, got {ttl!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.max_users = max_users
        self.max_bytes = max_bytes
        self.ttl = None if ttl is None else float(ttl)
        self._clock = clock
        # user -> (value, bytes, written at); order = least recently used first
        self._data: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.expirations = 0

    def _drop(self, user) -> None:
        _, nb, _ = self._data.pop(user)
        self._bytes -= nb

    def get(self, user: Hashable) -> Any | None:
        """The user's value, or None (absent or expired: an expired one is dropped and counted)."""
        with self._lock:
            ent = self._data.get(user)
            if ent is None:
                return None
            if self.ttl is not None and self._clock() - ent[2] >= self.ttl:
                self._drop(user)
                self.expirations += 1
                return None
            self._data.move_to_end(user)
            return ent[0]

    def put(self, user: Hashable, value: Any) -> None:
        """Store ``value`` for ``user`` (most recently used), evicting the least recently used
        others while over ``max_users`` / ``max_bytes``."""
        nb = _nbytes(value)
        with self._lock:
            if user in self._data:
                self._drop(user)
            self._data[user] = (value, nb, self._clock() if self.ttl is not None else 0.0)
            self._bytes += nb
            while len(self._data) > 1 and (
                    (self.max_users is not None and len(self._data) > self.max_users)
                    or (self.max_bytes is not None and self._bytes > self.max_bytes)):
                self._drop(next(iter(self._data)))
                self.evictions += 1

    def delete(self, user: Hashable) -> bool:
        """Remove the user's value; True if there was one."""
        with self._lock:
            if user in self._data:
                self._drop(user)
                return True
            return False

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        """A snapshot of ``(user, value)`` pairs, least recently used first (expired ones skipped)."""
        with self._lock:
            now = self._clock() if self.ttl is not None else 0.0
            snap = [(u, ent[0]) for u, ent in self._data.items()
                    if self.ttl is None or now - ent[2] < self.ttl]
        return iter(snap)

    @property
    def nbytes(self) -> int:
        """Bytes of the values held (the sum of their ``nbytes``)."""
        return self._bytes

    def stats(self) -> dict:
        """``{"users", "bytes", "evictions", "expirations", "max_users", "max_bytes", "ttl"}``."""
        with self._lock:
            return {"users": len(self._data), "bytes": self._bytes, "evictions": self.evictions,
                    "expirations": self.expirations, "max_users": self.max_users,
                    "max_bytes": self.max_bytes, "ttl": self.ttl}

    def __repr__(self) -> str:
        return (f"MemoryBackend(users={len(self._data)}, bytes={self._bytes}, max_users={self.max_users}, "
                f"max_bytes={self.max_bytes}, ttl={self.ttl})")
