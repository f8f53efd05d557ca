"""Benchmark 15-17 peer: the token-message semaphore of the RabbitMQ blog (2014,
"Distributed Semaphores with RabbitMQ"), with pika, against one RabbitMQ broker.

Usage:
  amqp_peer.py inproc URL OPS          uncontended acquire + release
  amqp_peer.py contended URL N SECS    N processes on one mutex for SECS seconds

The semaphore is a durable queue holding one token message (a mutex). A client consumes it
with `basic.qos(prefetch_count=1)` and manual acknowledgement; holding the lock is having
the delivery; release is `basic.reject(requeue=True)`, which puts the token back for the
next consumer (round robin among the consumers with room: no queue order, no fencing
token). The uncontended loop takes the token with `basic.get` (no consumer to set up) and
gives it back with `basic.reject`, followed by a `basic.qos` round trip so that each
release has been seen by the broker before the next `get` (reject has no answer).

inproc prints {"impl", "ops", "ns_per_op"}; contended prints {"impl", "clients",
"acquisitions", "seconds", "per_s", "wait_p50_ns", "wait_p99_ns", "jain", "violations"}:
the processes' grant..release intervals (CLOCK_MONOTONIC) merged and checked for overlap.
"""

import json
import multiprocessing as mp
import sys
import time
import uuid

import pika


def setup(url: str) -> str:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    name = "baton-bench-token-" + uuid.uuid4().hex[:8]
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    ch.basic_publish("", name, b"token", pika.BasicProperties(delivery_mode=2))
    conn.close()
    return name


def inproc(url: str, ops: int) -> None:
    name = setup(url)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()

    def cycle() -> None:
        method, _, _ = ch.basic_get(name, auto_ack=False)
        if method is None:
            raise SystemExit("amqp_peer.py: the token was not there")
        ch.basic_reject(method.delivery_tag, requeue=True)
        ch.basic_qos(prefetch_count=0)

    for _ in range(min(ops, 50)):
        cycle()
    start = time.perf_counter_ns()
    for _ in range(ops):
        cycle()
    elapsed = time.perf_counter_ns() - start
    ch.queue_delete(name)
    conn.close()
    print(json.dumps({"impl": "pika token message", "ops": ops, "ns_per_op": elapsed / ops}))


def percentile(xs, p):
    if not xs:
        return 0
    i = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[i]


def jain(counts):
    s = sum(counts)
    sq = sum(c * c for c in counts)
    return (s * s) / (len(counts) * sq) if sq else 1.0


def _child(url, name, shared, placeholder, ready, out):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    ready.release()
    while shared[0] == placeholder:
        time.sleep(0.001)
    start_at, end_at = shared[0], shared[1]
    now = time.monotonic_ns
    while now() < start_at:
        time.sleep(0.0005)
    holds, waits = [], []
    gen = ch.consume(name, auto_ack=False, inactivity_timeout=0.5)
    t_req = now()
    for method, _, _ in gen:
        if now() >= end_at:
            if method is not None:
                ch.basic_reject(method.delivery_tag, requeue=True)
            break
        if method is None:
            continue
        t_grant = now()
        t_rel = now()
        ch.basic_reject(method.delivery_tag, requeue=True)
        holds.append((t_grant, t_rel))
        waits.append(t_grant - t_req)
        t_req = now()
    ch.cancel()
    conn.close()
    out.put((holds, waits))


def contended(url: str, n: int, secs: float) -> None:
    name = setup(url)
    ctx = mp.get_context("fork")
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    placeholder = -1
    shared = ctx.Array("q", [placeholder, placeholder])
    procs = [ctx.Process(target=_child, args=(url, name, shared, placeholder, ready, out)) for _ in range(n)]
    for p in procs:
        p.start()
    for _ in range(n):
        if not ready.acquire(timeout=60):
            raise SystemExit("amqp_peer.py: a contended worker did not start")
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
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(name)
    conn.close()
    print(json.dumps({
        "impl": "pika token message", "clients": n, "acquisitions": len(holds),
        "seconds": seconds, "per_s": len(holds) / seconds,
        "wait_p50_ns": percentile(waits, 50), "wait_p99_ns": percentile(waits, 99),
        "jain": jain(counts), "violations": violations,
    }))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "inproc" and len(sys.argv) == 4:
        inproc(sys.argv[2], int(sys.argv[3]))
    elif cmd == "contended" and len(sys.argv) == 5:
        contended(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
