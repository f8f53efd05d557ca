"""The Python package against Python's file-lock libraries and against `baton run`.

In one run, in alternating rounds (each round starts with a different implementation),
uncontended acquire + release on one host's tmpfs:

  baton            `with store.lock(key):` on the directory store (`dir:PATH`, kernel
                   locks), a new Lock object each time (the documented idiom)
  baton-reused     `with lock:` on one Lock object
  fasteners        `with fasteners.InterProcessLock(path):` (fcntl), one object reused
  filelock         `with filelock.FileLock(path):` (flock), one object reused
  baton-run        `subprocess.run([baton, "run", "-k", key, "-s", url, "--", "true"])`,
                   the CLI spawned per lock, against the package's `with store.lock(key):
                   subprocess.run(["true"])` (baton-with-true), the same work in-process

Prints one JSON object per measurement (type "sample"), then one per implementation
(type "summary": median ns per op over the rounds), then a Markdown table with ratios.

Usage: bench_locks.py [--rounds N] [--ops N] [--spawn-ops N] [--baton PATH] [--dir DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import baton


def timed(fn, ops):
    start = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - start) / ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ops", type=int, default=5000)
    ap.add_argument("--spawn-ops", type=int, default=100)
    ap.add_argument("--baton", default=shutil.which("baton"))
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()

    import fasteners
    import filelock

    root = tempfile.mkdtemp(prefix="baton-pybench-", dir=args.dir)
    url = f"dir:{root}/baton"
    store = baton.open(url)
    reused = store.lock("bench-reused")
    fast = fasteners.InterProcessLock(os.path.join(root, "fasteners.lock"))
    flock = filelock.FileLock(os.path.join(root, "filelock.lock"))

    def op_baton():
        with store.lock("bench"):
            pass

    def op_reused():
        with reused:
            pass

    def op_fasteners():
        with fast:
            pass

    def op_filelock():
        with flock:
            pass

    def op_baton_true():
        with store.lock("bench-spawn"):
            subprocess.run(["true"], check=True)

    def op_baton_run():
        subprocess.run(
            [args.baton, "run", "-k", "bench-spawn", "-s", url, "--", "true"], check=True
        )

    inproc = {
        "baton": op_baton,
        "baton-reused": op_reused,
        "fasteners": op_fasteners,
        "filelock": op_filelock,
    }
    spawn = {"baton-with-true": op_baton_true}
    if args.baton:
        spawn["baton-run"] = op_baton_run
    else:
        print("bench_locks.py: no baton binary (--baton): skipping baton-run", file=sys.stderr)

    for fn in list(inproc.values()) + list(spawn.values()):  # warm up
        for _ in range(20):
            fn()

    samples = {name: [] for name in list(inproc) + list(spawn)}
    for r in range(args.rounds):
        for group, ops in ((inproc, args.ops), (spawn, args.spawn_ops)):
            names = list(group)
            k = r % len(names)
            for name in names[k:] + names[:k]:
                ns = timed(group[name], ops)
                samples[name].append(ns)
                print(json.dumps({"type": "sample", "impl": name, "round": r, "ops": ops,
                                  "ns_per_op": round(ns, 1)}))

    med = {name: statistics.median(v) for name, v in samples.items()}
    for name, m in med.items():
        print(json.dumps({"type": "summary", "impl": name, "median_ns_per_op": round(m, 1),
                          "rounds": args.rounds}))
    load = os.getloadavg()
    print()
    print(f"{args.rounds} rounds; {args.ops} ops per in-process sample, {args.spawn_ops} per"
          f" spawn sample; locks in {root} ({os.cpu_count()} CPUs, load {load[0]:.1f})")
    print()
    print("| implementation | median µs per acquire+release | vs `with store.lock()` |")
    print("|---|---|---|")
    for name, m in med.items():
        base = med["baton"] if name in inproc else med["baton-with-true"]
        print(f"| {name} | {m / 1000:.2f} | {m / base:.2f}× |")
    print()
    print(f"fasteners / baton = {med['fasteners'] / med['baton']:.2f}× "
          f"(target ≥ 2×); filelock / baton = {med['filelock'] / med['baton']:.2f}×")
    if "baton-run" in med:
        print(f"baton run per lock / package per lock (both running `true`) = "
              f"{med['baton-run'] / med['baton-with-true']:.2f}×")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
