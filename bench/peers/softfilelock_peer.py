"""Benchmark 1 peer: filelock.SoftFileLock, uncontended acquire + release.

SoftFileLock is what a Python user reaches for on a filesystem without trustworthy
kernel locks (NFS): the lock is the existence of a marker file, created with O_EXCL and
removed on release. It is the peer of baton's lease-file mode (`dir:PATH?mode=lease`).

Usage: softfilelock_peer.py LOCK_PATH OPS [WARMUP]
Prints one JSON object: {"impl": "softfilelock", "ops": OPS, "ns_per_op": ...}.
Interpreter start-up and the warm-up are outside the timed loop.
"""

import json
import sys
import time

import filelock


def main() -> None:
    path, ops = sys.argv[1], int(sys.argv[2])
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    lock = filelock.SoftFileLock(path)
    for _ in range(warmup):
        lock.acquire()
        lock.release()
    start = time.perf_counter_ns()
    for _ in range(ops):
        lock.acquire()
        lock.release()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": "softfilelock", "ops": ops, "ns_per_op": elapsed / ops}))


if __name__ == "__main__":
    main()
