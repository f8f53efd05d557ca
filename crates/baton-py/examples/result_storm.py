"""Many processes record results into one SQLite database at once.

Each worker takes the lock around its write, so writers never pile up on SQLite's own
lock ("database is locked"), and the write carries the lease's fencing token: a worker
that was paused past its lease and wakes up late has its write refused.

    python result_storm.py --workers 16 --jobs 200 --db /tmp/results.db
"""

import argparse
import multiprocessing
import sqlite3

import baton


def worker(store_url, db, jobs):
    store = baton.open(store_url)
    conn = sqlite3.connect(db, timeout=60)
    for job in jobs:
        value = job * job  # the work, done outside the lock
        with store.lock("results-db", ttl="30s", wait="5m") as lease:
            with baton.fenced(conn, lease) as tx:
                tx.execute(
                    "INSERT INTO results(job, value, token) VALUES (?, ?, ?)",
                    (job, value, lease.token),
                )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--db", default="/tmp/results.db")
    ap.add_argument("--store", default=None, help="store URL (default: the directory store)")
    args = ap.parse_args()
    store_url = args.store or baton.open().url

    conn = sqlite3.connect(args.db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS results"
        " (id INTEGER PRIMARY KEY AUTOINCREMENT, job INTEGER UNIQUE, value INTEGER, token INTEGER)"
    )
    conn.commit()
    shares = [list(range(i, args.jobs, args.workers)) for i in range(args.workers)]
    procs = [multiprocessing.Process(target=worker, args=(store_url, args.db, s)) for s in shares]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    (count,) = conn.execute("SELECT count(*) FROM results").fetchone()
    tokens = [t for (t,) in conn.execute("SELECT token FROM results ORDER BY id")]
    print(f"{count} results from {args.workers} workers; failed workers: {len(failed)}; "
          f"tokens increasing in commit order: {tokens == sorted(tokens)}")
    raise SystemExit(0 if count == args.jobs and not failed and tokens == sorted(tokens) else 1)


if __name__ == "__main__":
    main()
