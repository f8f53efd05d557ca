"""The fence: the resource side of fencing tokens, for a SQLite database.

A lock cannot stop a holder that was paused or partitioned past its lease from writing
late; the resource can. ``fenced`` keeps the highest token seen per key in the database's
own ``baton_fence`` table (the same table ``baton fence`` and the Rust library's
``baton::fence::Fence`` use) and runs your writes in the same ``BEGIN IMMEDIATE``
transaction as the check, so nothing slips in between.

    with store.lock("results", ttl="30s") as lease:
        with baton.fenced(conn, lease) as db:
            db.execute("INSERT INTO results VALUES (?, ?)", (job, value))

A write from an older grant than one already seen raises ``FencedError`` and nothing of it
is committed.
"""

import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

from ._errors import FencedError

# The same table as the Rust fence; STRICT where this Python's SQLite has it (3.37+).
_TABLE = (
    "CREATE TABLE IF NOT EXISTS baton_fence ("
    " key TEXT PRIMARY KEY NOT NULL, token INTEGER NOT NULL)"
    + (" STRICT" if sqlite3.sqlite_version_info >= (3, 37) else "")
)


@contextmanager
def fenced(
    conn: sqlite3.Connection,
    lease_or_key: Union[Any, str],
    token: Optional[int] = None,
    *,
    newer_only: bool = False,
) -> Iterator[sqlite3.Connection]:
    """Runs the block's writes on ``conn`` in one fenced transaction.

    ``lease_or_key``: a Lease (its key and token are used), or a key with ``token``.
    ``newer_only``: accept only a token higher than the highest seen (one write per
    grant); by default the same token may write again.

    Commits when the block ends, rolls back if it raises. Raises FencedError (rolled back)
    when a newer token was seen already: this holder lost the lock.
    """
    if isinstance(lease_or_key, str):
        key = lease_or_key
        if token is None:
            raise TypeError("fenced(conn, key, token): a token is needed with a key")
    else:
        key, token = lease_or_key.key, lease_or_key.token
    if token >= 2**63:
        raise ValueError(f"fence on '{key}': token {token} does not fit SQLite's INTEGER")
    saved = conn.isolation_level
    conn.isolation_level = None  # the transaction below is ours, not the module's
    try:
        conn.execute(_TABLE)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT token FROM baton_fence WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                highest = row[0]
                ok = token > highest if newer_only else token >= highest
                if not ok:
                    err = FencedError(
                        f"fence on '{key}': token {token} refused, token {highest} was "
                        "seen already (its holder lost the lock)"
                    )
                    err.kind, err.key = "fenced", key
                    raise err
            conn.execute(
                "INSERT INTO baton_fence(key, token) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET token = excluded.token",
                (key, token),
            )
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.isolation_level = saved
