"""Benchmark 12-15 peers: redis-py's Lock and python-redis-lock against one Redis server.

Usage:
  redis_peer.py inproc IMPL HOST PORT OPS        uncontended acquire + release
  redis_peer.py contended IMPL HOST PORT N SECS  N processes on one key for SECS seconds
  redis_peer.py ping HOST PORT OPS               PING round trips (the floor, measured)

IMPL is `redis-py` (`redis.lock.Lock`, ttl 30 s: SET NX PX to take it, a compare-and-delete
script to give it back; a blocking acquire polls every 0.1 s, the library's default) or
`redis-lock` (python-redis-lock's `redis_lock.Lock`, expire 30 s: a GET to check it is not
held already, SET NX EX, and on release a script that deletes the key and LPUSHes a signal
list; a blocking acquire waits in BLPOP on that list).

inproc prints {"impl", "ops", "ns_per_op"}; interpreter start-up, connecting and a warm-up
are outside the timed loop.

contended forks N processes (multiprocessing, one connection each); each loops blocking
acquire + release on the same key until the deadline, stamping request, grant and release
on CLOCK_MONOTONIC (one clock for every process). The parent merges the grant..release
intervals and counts overlaps (violations of mutual exclusion), and prints {"impl",
"clients", "acquisitions", "seconds", "per_s", "handoffs", "handoffs_per_s", "wait_p50_ns", "wait_p99_ns", "jain",
"violations", "counts"}.
"""

import json
import multiprocessing as mp
import sys
import time
import uuid

import redis

TTL_S = 30


def make_lock(impl: str, client: "redis.Redis", name: str):
    if impl == "redis-py":
        lock = client.lock(name, timeout=TTL_S, sleep=0.1, thread_local=False)

        def acquire(blocking: bool) -> bool:
            return lock.acquire(blocking=blocking)

        return acquire, lock.release
    if impl == "redis-lock":
        import redis_lock

        lock = redis_lock.Lock(client, name, expire=TTL_S)

        def acquire(blocking: bool) -> bool:
            return lock.acquire(blocking=blocking)

        return acquire, lock.release
    raise SystemExit(f"redis_peer.py: unknown impl {impl!r}")


def inproc(impl: str, host: str, port: int, ops: int) -> None:
    client = redis.Redis(host=host, port=port, db=0)
    acquire, release = make_lock(impl, client, "baton-bench-" + uuid.uuid4().hex[:8])

    def cycle() -> None:
        if not acquire(False):
            raise SystemExit("redis_peer.py: an uncontended acquire was refused")
        release()

    for _ in range(min(ops, 50)):
        cycle()
    start = time.perf_counter_ns()
    for _ in range(ops):
        cycle()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": impl, "ops": ops, "ns_per_op": elapsed / ops}))


def percentile(sorted_xs, p):
    if not sorted_xs:
        return 0
    i = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[i]


def jain(counts):
    s = sum(counts)
    sq = sum(c * c for c in counts)
    return (s * s) / (len(counts) * sq) if sq else 1.0


def contended(impl: str, host: str, port: int, n: int, secs: float) -> None:
    ctx = mp.get_context("fork")
    name = "baton-bench-contended-" + uuid.uuid4().hex[:8]
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    # Everyone connects, then starts at once at a time the parent sets in shared memory.
    placeholder = -1
    shared = ctx.Array("q", [placeholder, placeholder])
    procs = []
    for who in range(n):
        p = ctx.Process(target=_child, args=(impl, host, port, name, who, shared, placeholder, ready, out))
        p.start()
        procs.append(p)
    for _ in range(n):
        if not ready.acquire(timeout=60):
            raise SystemExit("redis_peer.py: a contended worker did not start")
    t0 = time.monotonic_ns() + 20_000_000
    shared[1] = t0 + int(secs * 1e9)
    shared[0] = t0
    results = [out.get(timeout=secs + 120) for _ in range(n)]
    for p in procs:
        p.join()
    holds = sorted(h for r in results for h in r[0])
    # The round lasts until the deadline, or the last release after it.
    seconds = (max([shared[1]] + [h[1] for h in holds]) - t0) / 1e9
    waits = sorted(w for r in results for w in r[1])
    counts = [len(r[0]) for r in results]
    violations = sum(1 for a, b in zip(holds, holds[1:]) if b[0] < a[1])
    # A hand-off: a grant whose process is not the previous grant's (in grant order).
    handoffs = sum(1 for a, b in zip(holds, holds[1:]) if b[2] != a[2])
    total = len(holds)
    print(json.dumps({
        "impl": impl, "clients": n, "acquisitions": total, "seconds": seconds,
        "per_s": total / seconds, "handoffs": handoffs,
        "handoffs_per_s": handoffs / seconds, "wait_p50_ns": percentile(waits, 50),
        "wait_p99_ns": percentile(waits, 99), "jain": jain(counts),
        "violations": violations, "counts": counts,
    }))


def _child(impl, host, port, name, who, shared, placeholder, ready, out):
    client = redis.Redis(host=host, port=port, db=0)
    client.ping()
    acquire, release = make_lock(impl, client, name)
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
        if not acquire(True):
            raise SystemExit("redis_peer.py: a blocking acquire returned False")
        t_grant = now()
        t_rel = now()
        release()
        holds.append((t_grant, t_rel, who))
        waits.append(t_grant - t_req)
    out.put((holds, waits))


def ping(host: str, port: int, ops: int) -> None:
    client = redis.Redis(host=host, port=port, db=0)
    for _ in range(50):
        client.ping()
    start = time.perf_counter_ns()
    for _ in range(ops):
        client.ping()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": "redis-py PING", "ops": ops, "ns_per_op": elapsed / ops}))


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "inproc":
        inproc(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "contended":
        contended(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    elif cmd == "ping":
        ping(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
