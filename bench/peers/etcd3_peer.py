"""Benchmark 9 peer: python-etcd3's Lock, uncontended acquire + release.

Usage: etcd3_peer.py HOST PORT OPS [WARMUP]
etcd3.Lock is the lock Python users of etcd reach for: a lease (TTL 60 s) and a key
created by a transaction if absent; release deletes the key (the lease is left to run
out, as the library does).
Prints one JSON object: {"impl": "etcd3-lock", "ops": OPS, "ns_per_op": ...}.
Interpreter start-up, connecting and the warm-up are outside the timed loop.
"""

import json
import os
import sys
import time
import uuid

# python-etcd3 ships protobuf code generated for protobuf 3; the pure-Python runtime
# reads it with any protobuf 3.x.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import etcd3  # noqa: E402


def main() -> None:
    host, port, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 50
    client = etcd3.client(host=host, port=port)
    lock = client.lock("baton-bench-" + uuid.uuid4().hex[:8], ttl=60)

    def cycle() -> None:
        if not lock.acquire(timeout=10):
            raise SystemExit("etcd3_peer.py: the lock was not granted")
        if not lock.release():
            raise SystemExit("etcd3_peer.py: the release found no key")

    for _ in range(warmup):
        cycle()
    start = time.perf_counter_ns()
    for _ in range(ops):
        cycle()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": "etcd3-lock", "ops": ops, "ns_per_op": elapsed / ops}))


if __name__ == "__main__":
    main()
