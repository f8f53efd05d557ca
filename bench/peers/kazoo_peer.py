"""Benchmark 15-18 peers: kazoo's Lock against one ZooKeeper server.

Usage:
  kazoo_peer.py inproc HOSTS PATH OPS        uncontended Lock acquire + release
  kazoo_peer.py floor HOSTS PATH OPS         create (ephemeral) + delete round trips
  kazoo_peer.py contended HOSTS PATH N SECS  N processes on one Lock for SECS seconds
  kazoo_peer.py waiters HOSTS PATH N         N processes queued on one Lock, drained
                                             hand-off by hand-off, counting watch events

HOSTS is kazoo's `h1:p1,h2:p2`; PATH a znode under which this run's locks go.

`kazoo.recipe.lock.Lock` (kazoo 2.x): acquire creates `PATH/<uuid>__lock__<seq>`
(ephemeral, sequential) and lists the children; a waiter watches its predecessor with
`get(…, watch)`; release deletes the node. The client is connected once, outside the
timed loop (the session is shared by every acquire, as baton's store handle shares its
session for a TTL).

inproc and floor print {"impl", "ops", "ns_per_op"}; contended prints {"impl", "clients",
"acquisitions", "seconds", "per_s", "wait_p50_ns", "wait_p99_ns", "jain", "violations",
"counts"} with grant..release intervals on CLOCK_MONOTONIC merged and checked for
overlap; waiters prints {"impl", "waiters", "releases", "wakeups", "wakeups_per_release",
"handoff_ns"}: the watch callbacks kazoo's Lock ran (`_watch_predecessor`) in every
process, summed, and the drain time per hand-off.
"""

import json
import multiprocessing as mp
import sys
import time
import uuid

from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock


def client(hosts: str) -> KazooClient:
    c = KazooClient(hosts=hosts, timeout=30.0)
    c.start(timeout=30)
    return c


def inproc(hosts: str, path: str, ops: int) -> None:
    c = client(hosts)
    lock = c.Lock(f"{path}/inproc-{uuid.uuid4().hex[:8]}", "baton-bench")

    def cycle() -> None:
        if not lock.acquire(blocking=False):
            raise SystemExit("kazoo_peer.py: an uncontended acquire was refused")
        lock.release()

    for _ in range(min(ops, 50)):
        cycle()
    start = time.perf_counter_ns()
    for _ in range(ops):
        cycle()
    elapsed = time.perf_counter_ns() - start
    c.stop()
    c.close()
    print(json.dumps({"impl": "kazoo", "ops": ops, "ns_per_op": elapsed / ops}))


def floor(hosts: str, path: str, ops: int) -> None:
    c = client(hosts)
    base = f"{path}/floor-{uuid.uuid4().hex[:8]}"
    c.ensure_path(base)

    def cycle() -> None:
        p = c.create(base + "/n", b"", ephemeral=True, sequence=True)
        c.delete(p)

    for _ in range(min(ops, 50)):
        cycle()
    start = time.perf_counter_ns()
    for _ in range(ops):
        cycle()
    elapsed = time.perf_counter_ns() - start
    c.delete(base)
    c.stop()
    c.close()
    print(json.dumps({"impl": "kazoo create+delete", "ops": ops, "ns_per_op": elapsed / ops}))


def percentile(sorted_xs, p):
    if not sorted_xs:
        return 0
    i = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[i]


def jain(counts):
    s = sum(counts)
    sq = sum(c * c for c in counts)
    return (s * s) / (len(counts) * sq) if sq else 1.0


def contended(hosts: str, path: str, n: int, secs: float) -> None:
    ctx = mp.get_context("fork")
    name = f"{path}/contended-{uuid.uuid4().hex[:8]}"
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    placeholder = -1
    shared = ctx.Array("q", [placeholder, placeholder])
    procs = []
    for _ in range(n):
        p = ctx.Process(target=_child, args=(hosts, name, shared, placeholder, ready, out))
        p.start()
        procs.append(p)
    for _ in range(n):
        if not ready.acquire(timeout=120):
            raise SystemExit("kazoo_peer.py: a contended worker did not start")
    t0 = time.monotonic_ns() + 20_000_000
    shared[1] = t0 + int(secs * 1e9)
    shared[0] = t0
    results = [out.get(timeout=secs + 120) for _ in range(n)]
    for p in procs:
        p.join()
    holds = sorted(h for r in results for h in r[0])
    seconds = (max([shared[1]] + [h[1] for h in holds]) - t0) / 1e9
    waits = sorted(w for r in results for w in r[1])
    counts = [len(r[0]) for r in results]
    violations = sum(1 for a, b in zip(holds, holds[1:]) if b[0] < a[1])
    total = len(holds)
    print(json.dumps({
        "impl": "kazoo", "clients": n, "acquisitions": total, "seconds": seconds,
        "per_s": total / seconds, "wait_p50_ns": percentile(waits, 50),
        "wait_p99_ns": percentile(waits, 99), "jain": jain(counts),
        "violations": violations, "counts": counts,
    }))


def _child(hosts, name, shared, placeholder, ready, out):
    c = client(hosts)
    lock = c.Lock(name, "baton-bench")
    ready.release()
    while shared[0] == placeholder:
        time.sleep(0.001)
    start_at, end_at = shared[0], shared[1]
    now = time.monotonic_ns
    while now() < start_at:
        time.sleep(0.0005)
    holds = []
    waits = []
    while now() < end_at:
        t_req = now()
        if not lock.acquire(blocking=True):
            raise SystemExit("kazoo_peer.py: a blocking acquire returned False")
        t_grant = now()
        t_rel = now()
        lock.release()
        holds.append((t_grant, t_rel))
        waits.append(t_grant - t_req)
    c.stop()
    c.close()
    out.put((holds, waits))


class CountingLock(Lock):
    """kazoo's Lock, counting the predecessor watch events that wake it."""

    wakeups = 0

    def _watch_predecessor(self, event):
        CountingLock.wakeups += 1
        return super()._watch_predecessor(event)


def waiters(hosts: str, path: str, n: int) -> None:
    """A holder here and N waiter processes queued behind it, each its own session. The
    holder releases, and each waiter releases as soon as it is granted, so the queue
    drains through N hand-offs; every process counts the watch events that woke it."""
    ctx = mp.get_context("fork")
    name = f"{path}/waiters-{uuid.uuid4().hex[:8]}"
    c = client(hosts)
    holder = c.Lock(name, "holder")
    assert holder.acquire(blocking=False)
    out = ctx.Queue()
    procs = []
    for _ in range(n):
        p = ctx.Process(target=_waiter, args=(hosts, name, out))
        p.start()
        procs.append(p)
    deadline = time.monotonic() + 120
    while len(c.get_children(name)) < n + 1:
        if time.monotonic() > deadline:
            raise SystemExit("kazoo_peer.py: the waiters did not queue")
        time.sleep(0.01)
    # Let every waiter set its watch.
    time.sleep(0.5)
    t0 = time.monotonic_ns()
    holder.release()
    results = [out.get(timeout=300) for _ in range(n)]
    drained = max(r[1] for r in results) - t0
    for p in procs:
        p.join()
    c.stop()
    c.close()
    total = sum(r[0] for r in results)
    print(json.dumps({
        "impl": "kazoo", "waiters": n, "releases": n + 1, "wakeups": total,
        "wakeups_per_release": total / n, "handoff_ns": drained / n,
    }))


def _waiter(hosts, name, out):
    c = client(hosts)
    lock = CountingLock(c, name, "waiter")
    if not lock.acquire(blocking=True, timeout=300):
        raise SystemExit("kazoo_peer.py: a waiter was never granted")
    granted = time.monotonic_ns()
    lock.release()
    count = CountingLock.wakeups
    c.stop()
    c.close()
    out.put((count, granted))


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "inproc":
        inproc(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "floor":
        floor(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "contended":
        contended(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif cmd == "waiters":
        waiters(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
