"""Benchmark 1 peers: a Python lock library's uncontended acquire + release.

Usage: peer.py IMPL LOCK_PATH OPS [WARMUP]
IMPL is one of:
  fasteners     fasteners.InterProcessLock (fcntl locks)
  filelock      filelock.FileLock (flock)
  softfilelock  filelock.SoftFileLock: the lock is a marker file created with O_EXCL and
                removed on release -- what a Python user reaches for on a filesystem
                without trustworthy kernel locks (NFS), so the peer of baton's lease-file
                mode (`dir:PATH?mode=lease`)
Prints one JSON object: {"impl": IMPL, "ops": OPS, "ns_per_op": ...}.
Interpreter start-up and the warm-up are outside the timed loop.
"""

import json
import sys
import time


def make_lock(impl: str, path: str):
    if impl == "fasteners":
        import fasteners

        return fasteners.InterProcessLock(path)
    if impl == "filelock":
        import filelock

        return filelock.FileLock(path)
    if impl == "softfilelock":
        import filelock

        return filelock.SoftFileLock(path)
    raise SystemExit(f"peer.py: unknown implementation {impl!r}")


def main() -> None:
    impl, path, ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    lock = make_lock(impl, path)
    for _ in range(warmup):
        lock.acquire()
        lock.release()
    start = time.perf_counter_ns()
    for _ in range(ops):
        lock.acquire()
        lock.release()
    elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": impl, "ops": ops, "ns_per_op": elapsed / ops}))


if __name__ == "__main__":
    main()
