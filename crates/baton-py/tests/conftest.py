"""Fixtures: one store URL per store this build has. dir, dir lease mode and SQLite always
(in a temporary directory); PostgreSQL, etcd, Redis, ZooKeeper and RabbitMQ from
BATON_TEST_POSTGRES / BATON_TEST_ETCD / BATON_TEST_REDIS / BATON_TEST_ZK / BATON_TEST_AMQP.
Without those a networked test is skipped, and under CI=true it fails instead."""

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import baton

LOCAL = ["dir", "dir-lease", "sqlite"]
NETWORKED = {
    "postgres": "BATON_TEST_POSTGRES",
    "etcd": "BATON_TEST_ETCD",
    "redis": "BATON_TEST_REDIS",
    "zk": "BATON_TEST_ZK",
    "amqp": "BATON_TEST_AMQP",
}
ALL = LOCAL + list(NETWORKED)
LEASE = ["dir-lease", "sqlite", "postgres", "etcd", "redis", "zk", "amqp"]
# Short TTLs for loss tests; etcd grants leases of at least 2s; a ZooKeeper lease is a
# session whose timeout is the TTL (the test server accepts 1s..60s; 2s leaves room for
# a loaded machine's scheduler); a RabbitMQ lease's heartbeat is half its TTL, whole
# seconds, so 2s gives the shortest, 1s.
SHORT_TTL = {"dir-lease": "1s", "sqlite": "1s", "postgres": "1s", "etcd": "2s", "redis": "1s",
             "zk": "2s", "amqp": "2s"}


def url_for(kind: str, tmp_path) -> str:
    if kind == "dir":
        return f"dir:{tmp_path}/locks"
    if kind == "dir-lease":
        return f"dir:{tmp_path}/leases?mode=lease"
    if kind == "sqlite":
        return f"sqlite:{tmp_path}/locks.db"
    url = os.environ.get(NETWORKED[kind])
    if not url:
        msg = f"{NETWORKED[kind]} is not set: no {kind} server to test against"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: a missing server fails the run)")
        pytest.skip(msg)
    return url


@pytest.fixture(params=ALL)
def kind(request):
    return request.param


@pytest.fixture
def url(kind, tmp_path):
    return url_for(kind, tmp_path)


@pytest.fixture
def store(url):
    return baton.open(url)


@pytest.fixture(params=LEASE)
def lease_kind(request):
    return request.param


@pytest.fixture
def lease_url(lease_kind, tmp_path):
    return url_for(lease_kind, tmp_path)


@pytest.fixture
def key():
    # Unique per test: the networked servers are shared by every test of the run.
    return f"pytest/{uuid.uuid4().hex[:16]}"


def waiters(store, key):
    """How many wait for key, or None when the store cannot tell."""
    return store.status(key)["waiters"]


def eventually(pred, what, limit=30.0):
    """Polls pred until true. The limit only keeps a broken build from hanging the run;
    no pass/fail depends on how soon it turns true."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    pytest.fail(f"never happened: {what}")


def wait_for_waiter(store, key, settle=0.3):
    """Until a waiter is queued on key: seen in status where the store counts waiters,
    else after a short pause (the waiter then at least had the chance to queue)."""
    if waiters(store, key) is None:
        time.sleep(settle)
        return
    eventually(lambda: (waiters(store, key) or 0) >= 1, "a waiter is queued")


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    """Starts a Python child running code (dedented) with the package importable."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
