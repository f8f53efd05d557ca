"""Benchmark 1 peer: fasteners.InterProcessLock, uncontended acquire + release.

Usage: fasteners_peer.py LOCK_PATH OPS [WARMUP]
Prints one JSON object: {"impl": "fasteners", "ops": OPS, "ns_per_op": ...}.
Interpreter start-up and the warm-up are outside the timed loop.
"""

import json
import sys
import time

import fasteners


def main() -> None:
    path, ops = sys.argv[1], int(sys.argv[2])
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    lock = fasteners.InterProcessLock(path)
    for _ in range(warmup):
        lock.acquire()
        lock.release()
    start = time.perf_counter_ns()
    for _ in range(ops):
        lock.acquire()
        lock.release()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": "fasteners", "ops": ops, "ns_per_op": elapsed / ops}))


if __name__ == "__main__":
    main()
