"""Benchmark 7 peer: a PostgreSQL lease-table lock hand-rolled with psycopg 3.

Usage: pg_lease_peer.py CONNINFO OPS [WARMUP]
The lock is what people write when they need a lock with a TTL in PostgreSQL: a table of
(name, holder, expires_at), taken by an INSERT ... ON CONFLICT DO UPDATE that only steals
an expired row, released by a DELETE of one's own row, on an autocommit connection (one
round trip each; psycopg prepares the statements after a few executions).
Prints one JSON object: {"impl": "psycopg-lease", "ops": OPS, "ns_per_op": ...}.
Interpreter start-up, connecting and the warm-up are outside the timed loop.
"""

import json
import sys
import time
import uuid

import psycopg

ACQUIRE = """
INSERT INTO py_locks (name, holder, expires_at)
VALUES (%s, %s, now() + interval '30 seconds')
ON CONFLICT (name) DO UPDATE
   SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
 WHERE py_locks.expires_at < now()
RETURNING holder
"""
RELEASE = "DELETE FROM py_locks WHERE name = %s AND holder = %s"


def main() -> None:
    conninfo, ops = sys.argv[1], int(sys.argv[2])
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    name = "bench-" + uuid.uuid4().hex[:8]
    me = uuid.uuid4().hex
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS py_locks ("
            " name text PRIMARY KEY, holder text NOT NULL, expires_at timestamptz NOT NULL)"
        )

        def cycle() -> None:
            row = conn.execute(ACQUIRE, (name, me)).fetchone()
            if row is None or row[0] != me:
                raise SystemExit("pg_lease_peer.py: the lock was not granted")
            if conn.execute(RELEASE, (name, me)).rowcount != 1:
                raise SystemExit("pg_lease_peer.py: the release found no row")

        for _ in range(warmup):
            cycle()
        start = time.perf_counter_ns()
        for _ in range(ops):
            cycle()
        elapsed = time.perf_counter_ns() - start
    print(json.dumps({"impl": "psycopg-lease", "ops": ops, "ns_per_op": elapsed / ops}))


if __name__ == "__main__":
    main()
