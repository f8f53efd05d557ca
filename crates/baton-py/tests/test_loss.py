"""Loss on lease stores: a holder frozen by SIGSTOP past its TTL is superseded; when it
resumes, its lease is lost (lease.lost, on_lost, LostError at the end of the with block)
and its late write is refused by the fence, because its token is lower."""

import json
import signal
import sqlite3
import threading

import pytest

import baton
from conftest import SHORT_TTL, eventually, python

HOLDER = """
import json, sys, threading, sqlite3, baton
url, key, ttl, db = sys.argv[1:5]
store = baton.open(url)
lost = threading.Event()
out = {}
try:
    with store.lock(key, ttl=ttl) as lease:
        lease.on_lost(lost.set)
        print(json.dumps({"token": lease.token}), flush=True)
        sys.stdin.readline()                       # frozen (SIGSTOP) here, then resumed
        out["lost_seen"] = lost.wait(60)           # liveness bound only
        out["lost"] = lease.lost
        out["reason"] = lease.lost_reason
        conn = sqlite3.connect(db, timeout=60)
        try:
            with baton.fenced(conn, lease) as c:
                c.execute("INSERT INTO results VALUES (?, ?)", (lease.token, "late"))
            out["write"] = "accepted"
        except baton.FencedError as e:
            out["write"] = "refused: " + str(e)
except baton.LostError as e:
    out["exit"] = "LostError: " + str(e)
else:
    out["exit"] = "no error"
print(json.dumps(out), flush=True)
"""


def test_a_frozen_holder_is_superseded_and_fenced(lease_kind, lease_url, key, tmp_path):
    db = str(tmp_path / "results.db")
    conn = sqlite3.connect(db, timeout=60)
    conn.execute("CREATE TABLE results (token INTEGER, who TEXT)")
    conn.commit()
    child = python(HOLDER, lease_url, key, SHORT_TTL[lease_kind], db)
    try:
        first = json.loads(child.stdout.readline())
        child.send_signal(signal.SIGSTOP)
        store = baton.open(lease_url)
        # Granted once the frozen holder's lease has expired.
        with store.lock(key, ttl="30s", wait="60s") as lease:
            assert lease.token > first["token"]
            with baton.fenced(conn, lease) as c:
                c.execute("INSERT INTO results VALUES (?, ?)", (lease.token, "new"))
            child.send_signal(signal.SIGCONT)
            child.stdin.write("go\n")
            child.stdin.flush()
            out, err = child.communicate(timeout=120)
            report = json.loads(out.strip().splitlines()[-1])
            assert report["lost_seen"] and report["lost"], (report, err)
            assert report["reason"]
            assert report["write"].startswith("refused"), report
            assert report["exit"].startswith("LostError"), report
            # The new holder was never disturbed.
            assert not lease.lost
    finally:
        child.kill()
        child.wait()
    rows = conn.execute("SELECT token, who FROM results").fetchall()
    assert [w for _, w in rows] == ["new"]


def test_a_broken_lease_is_lost_and_raises_at_the_end_of_the_block(lease_url, key):
    store = baton.open(lease_url)
    if not store.capabilities["break_lease"]:
        with store.lock(key, ttl="3s"):
            with pytest.raises(baton.UnsupportedError):
                baton.open(lease_url).break_lease(key)
        return
    called = threading.Event()
    with pytest.raises(baton.LostError) as e:
        with store.lock(key, ttl="3s") as lease:
            lease.on_lost(called.set)
            assert not lease.lost
            assert baton.open(lease_url).break_lease(key) == 1
            eventually(lambda: lease.lost, "the keeper notices the break")
            assert called.wait(30)
    assert isinstance(e.value, baton.Error) and e.value.kind == "lost"
    assert "lost" in str(e.value)
    # The slot is free for the next holder.
    store.lock(key, wait=0).acquire().release()


def test_a_lease_kept_past_its_ttl_stays_held(lease_url, key):
    """The keeper renews on its own thread and never needs the GIL: while this thread
    spins in Python code for three TTLs, the lease stays held, nobody else can take it,
    and the release finds it held (no LostError)."""
    import time

    store = baton.open(lease_url)
    with store.lock(key, ttl="2s") as lease:
        end = time.monotonic() + 6
        spins = 0
        while time.monotonic() < end:
            spins += 1
        assert not lease.lost
        with pytest.raises(baton.BusyError):
            baton.open(lease_url).lock(key, wait=0).acquire()
        assert store.status(key)["holders"][0]["token"] == lease.token
    assert not lease.lost
