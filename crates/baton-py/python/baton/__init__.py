"""baton: mutexes, counting semaphores and leader leases, each grant carrying a fencing
token, over a store chosen by URL -- the same stores, locks and tokens as the ``baton``
CLI and Rust library.

    import baton
    store = baton.open("sqlite:/var/lib/app/locks.db")   # baton.open(): the default store
    with store.lock("nightly", ttl="30s", wait="10s") as lease:
        print(lease.token)                               # strictly increasing per key

    async with store.lock("pool", slots=4) as lease:     # asyncio: the loop never blocks
        ...

Stores: ``dir:PATH`` (kernel locks; the default directory when no URL is given),
``dir:PATH?mode=lease`` (lease files), ``sqlite:PATH``, ``postgres://...``,
``etcd://h1:2379,h2:2379``. Waits release the GIL; Ctrl-C and asyncio cancellation cancel
a wait and leave nothing queued in the store. On lease stores a keeper thread renews each
lease every TTL/3; a lost lease sets ``lease.lost``, runs ``lease.on_lost`` callbacks and
raises ``LostError`` at the end of the ``with`` block. A forked child's copy of a lease is
inert: it never renews or releases the parent's lease.
"""

import asyncio
import os
from contextvars import ContextVar
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import _baton
from ._errors import (
    BusyError,
    CorruptError,
    Error,
    FencedError,
    InvalidInputError,
    InvalidKeyError,
    LimitMismatchError,
    LostError,
    NotFoundError,
    NotHeldError,
    TimeoutError,
    UnavailableError,
    UnsupportedError,
)
from .fence import fenced

__version__ = _baton.__version__

__all__ = [
    "open",
    "Store",
    "Lock",
    "Lease",
    "parse_duration",
    "fenced",
    "Error",
    "BusyError",
    "TimeoutError",
    "LostError",
    "NotHeldError",
    "NotFoundError",
    "InvalidKeyError",
    "InvalidInputError",
    "LimitMismatchError",
    "UnavailableError",
    "CorruptError",
    "UnsupportedError",
    "FencedError",
]

Duration = Union[str, int, float, Any]  # "500ms", "1m30s", seconds, or a timedelta

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_baton._after_fork_in_child)


def parse_duration(value: Duration) -> float:
    """Seconds from a duration as ``ttl=``/``wait=`` take it: ``"500ms"``, ``"2s"``,
    ``"1m30s"``, ``2.5`` (seconds), or a ``datetime.timedelta``."""
    return _baton.parse_duration(value)


def open(url: Optional[str] = None) -> "Store":  # noqa: A001 - the package's entry point
    """Opens the store ``url`` names. Without a URL: ``$BATON_STORE`` if set, else the
    default directory store (``$XDG_RUNTIME_DIR/baton``, else ``/tmp/baton-$UID``).
    A bare absolute path means ``dir:PATH``."""
    return Store(_baton.open(url))


async def _run(start: Callable[[Any, Callable[[Any, Any], None]], Any]) -> Any:
    """Runs a native operation for asyncio and awaits its one report.

    On cancellation the native operation is cancelled (its Rust future dropped: the
    library's cancel, after which the store keeps nothing of the wait) and this waits
    until the drop has happened before re-raising. SQLite, PostgreSQL and etcd finish
    removing the withdrawn waiter on their own threads just after. A lease that was
    granted in the same instant is released first.
    """
    loop = asyncio.get_running_loop()
    done: "asyncio.Future[Tuple[Any, Any]]" = loop.create_future()

    def report(value: Any, error: Any) -> None:
        if not done.done():
            done.set_result((value, error))

    op = start(loop, report)
    try:
        value, error = await asyncio.shield(done)
    except asyncio.CancelledError:
        op.cancel()
        while True:
            try:
                value, error = await asyncio.shield(done)
                break
            except asyncio.CancelledError:
                continue
        if isinstance(value, _baton.Lease):
            try:
                await _run(value._release_start)
            except Error:
                pass
        raise
    if error is not None:
        raise error
    return value


Lease = _baton.Lease


# The leases each Lock holds, per thread and per asyncio task: {lock: (lease, ...)}.
# A fresh dict is set on every change (contexts are copied shallowly), so a task or thread
# never sees another's leases. Keyed by the Lock itself, never by id(): an entry left by a
# Lock whose lease was released directly must not be found by a new Lock at the same
# address; such entries are dropped once none of their leases is held.
_NOTHING: Dict[int, Tuple[Any, ...]] = {}
_HELD: "ContextVar[Dict[int, Tuple[Any, ...]]]" = ContextVar("baton_held", default=_NOTHING)


class Lock:
    """A request for one slot of a key: ``with``, ``async with``, or ``acquire()`` /
    ``release()``.

    One Lock may be used by many threads and asyncio tasks at once (a pool shared by
    tasks): each ``with`` holds its own lease, and ``release()`` releases the lease this
    thread or task acquired last through this Lock.
    """

    __slots__ = ("_req", "__weakref__")

    def __init__(self, request: Any) -> None:
        self._req = request

    @property
    def key(self) -> str:
        return self._req.key

    def _push(self, lease: Any) -> None:
        held = _HELD.get()
        if not held:
            _HELD.set({self: (lease,)})
            return
        held = {k: v for k, v in held.items() if k is self or any(l.held for l in v)}
        held[self] = held.get(self, ()) + (lease,)
        _HELD.set(held)

    def _pop(self) -> Any:
        held = _HELD.get()
        mine = held.get(self, ())
        if not mine:
            raise RuntimeError(
                "baton: release() of a Lock that holds nothing in this thread or task"
            )
        lease = mine[-1]
        if len(held) == 1 and len(mine) == 1:
            _HELD.set(_NOTHING)
            return lease
        held = dict(held)
        if len(mine) == 1:
            del held[self]
        else:
            held[self] = mine[:-1]
        _HELD.set(held)
        return lease

    def acquire(self) -> Any:
        """Acquires a slot, waiting as ``wait=`` said (None: forever; 0: not at all).

        The GIL is released while waiting; Ctrl-C cancels the wait (nothing stays queued
        in the store) and raises KeyboardInterrupt. Raises BusyError (``wait=0`` and every
        slot held), TimeoutError, LimitMismatchError, UnavailableError, CorruptError.
        """
        lease = self._req.acquire()
        self._push(lease)
        return lease

    async def acquire_async(self) -> Any:
        """``acquire()`` for asyncio: the loop keeps running while it waits, and
        cancelling the task cancels the wait (nothing stays queued in the store)."""
        lease = await _run(self._req._acquire_start)
        self._push(lease)
        return lease

    def release(self) -> None:
        """Releases the lease this thread or task acquired last through this Lock.
        Raises LostError if it was lost."""
        self._pop().release()

    async def release_async(self) -> None:
        """``release()`` for asyncio."""
        await self._pop().release_async()

    def __enter__(self) -> Any:
        lease = self._req.acquire()
        # _push, inlined for the common case: this context holds nothing yet.
        if _HELD.get():
            self._push(lease)
        else:
            _HELD.set({self: (lease,)})
        return lease

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        held = _HELD.get()
        mine = held.get(self)
        # _pop, inlined for the common case: this is the context's only lease.
        if len(held) == 1 and mine is not None and len(mine) == 1:
            _HELD.set(_NOTHING)
            lease = mine[0]
        else:
            lease = self._pop()
        try:
            lease.release()
        except LostError:
            # A lost lease is reported unless the block failed already: its own
            # exception is the one to see.
            if exc_type is None:
                raise

    async def __aenter__(self) -> Any:
        return await self.acquire_async()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        lease = self._pop()
        try:
            await lease.release_async()
        except LostError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return f"<baton.Lock key={self.key!r}>"


class Store:
    """A store opened by ``baton.open(url)``."""

    __slots__ = ("_store",)

    def __init__(self, native: Any) -> None:
        self._store = native

    @property
    def url(self) -> str:
        """The store's URL, without secrets."""
        return self._store.url

    @property
    def capabilities(self) -> Dict[str, Any]:
        """What the store can do: renew, break_lease, resize, fifo, lock_delay (bools) and
        recovery (how soon a dead holder's slot comes back, in words)."""
        return self._store.capabilities

    def lock(
        self,
        key: str,
        slots: int = 1,
        ttl: Optional[Duration] = None,
        wait: Optional[Duration] = None,
    ) -> Lock:
        """A Lock on ``key``: a mutex (``slots=1``) or a semaphore of ``slots`` slots.

        ttl: the lease's time to live on lease stores (default 30s; at least 100ms),
        renewed every TTL/3 by a keeper thread; kernel-lock stores ignore it.
        wait: None waits forever, 0 not at all (BusyError), else at most that long
        (TimeoutError). Durations: ``"500ms"``, ``"1m30s"``, seconds, a timedelta.
        Raises InvalidKeyError / InvalidInputError at once for a bad key or duration.
        """
        return Lock(self._store.request(key, slots, ttl, wait))

    def status(self, key: str) -> Dict[str, Any]:
        """A key's state: ``key``, ``limit``, ``held`` (count), ``waiters`` (None when the
        store cannot tell), ``last_token``, ``lock_delay``, ``holders`` (one dict per held
        slot: slot, token, holder, pid, host, user, command, started, created, heartbeat,
        expires, note; times in Unix seconds) and ``slots`` (slot, state, token, note).
        Raises NotFoundError for a key never used (on stores that can tell)."""
        return self._store.status(key)

    def leader(self, key: str) -> Optional[Dict[str, Any]]:
        """Who leads ``key`` (holds its one slot): a dict with key, token, since, holder,
        pid, host, user, command, started; None when nobody does. Only reads: never decide
        that you lead from it; hold the lock. Raises LimitMismatchError on a semaphore."""
        return self._store.leader(key)

    def resize(
        self, key: str, limit: Optional[int] = None, *, by: Optional[int] = None
    ) -> Dict[str, Any]:
        """Changes a key's limit (lease stores), to `limit` or by the step `by` (applied
        atomically to the store's limit; a limit stays at least 1), and returns its
        status. Lowering it never evicts a holder. Raises UnsupportedError on kernel-lock
        stores."""
        return self._store.resize(key, limit, by)

    def keys(self) -> List[str]:
        """Every key in the store, sorted."""
        return self._store.keys()

    def break_lease(self, key: str, holder: Optional[str] = None) -> int:
        """Frees the slots of ``key`` held by ``holder`` (every holder's when None) on
        lease stores; returns how many it freed. The broken holder's keeper finds out at
        its next renewal."""
        return self._store.break_lease(key, holder)

    def delete(self, key: str) -> None:
        """Removes a key nobody holds or waits for: its limit and records go, the next
        lock makes it anew, and its tokens keep rising. Raises BusyError while a slot is
        held or a request waits, NotFoundError for no such key, UnsupportedError on the
        directory store."""
        self._store.delete(key)

    def barrier(
        self, key: str, parties: int, wait: Optional[Duration] = None
    ) -> Dict[str, Any]:
        """Arrives at barrier ``key`` and waits until ``parties`` parties have arrived;
        returns ``{"key", "generation", "parties"}``. A timeout withdraws the arrival and
        raises TimeoutError."""
        return self._store.barrier(key, parties, wait)

    async def barrier_async(
        self, key: str, parties: int, wait: Optional[Duration] = None
    ) -> Dict[str, Any]:
        """``barrier()`` for asyncio; cancelling the task withdraws the arrival."""
        store = self._store
        return await _run(
            lambda loop, report: store._barrier_start(key, parties, wait, loop, report)
        )

    def __repr__(self) -> str:
        return f"<baton.Store {self.url}>"
