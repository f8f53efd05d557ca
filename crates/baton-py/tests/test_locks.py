"""Locks on every store, synchronously: grants, tokens, semaphores, every error class."""

import builtins
import datetime
import os
import re
import subprocess

import pytest

import baton
from conftest import eventually


def test_with_lock_grants_a_lease_with_a_token(store, key):
    with store.lock(key, wait="10s") as lease:
        assert lease.key == key
        assert lease.slot == 0
        assert isinstance(lease.token, int) and lease.token > 0
        assert re.fullmatch(r"[0-9a-f]{32}", lease.holder)
        assert lease.lost is False and lease.held is True
        st = store.status(key)
        assert st["limit"] == 1 and st["held"] == 1
        (h,) = st["holders"]
        assert (h["pid"], h["token"], h["holder"]) == (os.getpid(), lease.token, lease.holder)
        assert h["host"] and isinstance(h["created"], float)
    assert lease.held is False
    assert store.status(key)["held"] == 0


def test_tokens_strictly_increase(store, key):
    tokens = []
    for _ in range(4):
        with store.lock(key) as lease:
            tokens.append(lease.token)
    assert tokens == sorted(set(tokens)), tokens


def test_explicit_acquire_and_release(store, key):
    lock = store.lock(key, wait=0)
    lease = lock.acquire()
    with pytest.raises(baton.BusyError):
        store.lock(key, wait=0).acquire()
    lock.release()
    lease.release()  # idempotent
    again = store.lock(key, wait=0).acquire()
    assert again.token > lease.token
    again.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_busy_without_waiting(store, key):
    with store.lock(key):
        with pytest.raises(baton.BusyError) as e:
            with store.lock(key, wait=0):
                pass
    assert isinstance(e.value, baton.Error)
    assert e.value.kind == "busy" and e.value.retryable
    assert key in str(e.value)


def test_timeout_is_also_the_builtin_timeout_error(store, key):
    with store.lock(key):
        with pytest.raises(builtins.TimeoutError) as e:
            store.lock(key, wait="300ms").acquire()
    assert isinstance(e.value, baton.TimeoutError)
    assert isinstance(e.value, baton.Error)
    assert e.value.kind == "timeout"


def test_a_semaphore_grants_at_most_its_slots(store, key):
    leases = [store.lock(key, slots=3, wait="10s").acquire() for _ in range(3)]
    assert sorted(l.slot for l in leases) == [0, 1, 2]
    with pytest.raises(baton.BusyError):
        store.lock(key, slots=3, wait=0).acquire()
    assert store.status(key)["held"] == 3
    leases[1].release()
    fourth = store.lock(key, slots=3, wait="10s").acquire()
    assert fourth.slot == leases[1].slot
    for l in leases + [fourth]:
        l.release()


def test_limit_mismatch_names_the_current_limit(store, key):
    with store.lock(key, slots=2):
        with pytest.raises(baton.LimitMismatchError) as e:
            store.lock(key, slots=3, wait=0).acquire()
    assert e.value.current_limit == 2


def test_invalid_keys_and_arguments_fail_at_once(store):
    for bad in ["", "../etc", "/abs", "a b", "x" * 201]:
        with pytest.raises(baton.InvalidKeyError):
            store.lock(bad)
    assert issubclass(baton.InvalidKeyError, ValueError)
    with pytest.raises(baton.InvalidInputError):
        store.lock("k", wait="soon")
    with pytest.raises(baton.InvalidInputError):
        store.lock("k", wait=-1)
    with pytest.raises(baton.InvalidInputError):
        store.lock("k", ttl="10ms")
    with pytest.raises(baton.InvalidInputError):
        store.lock("k", slots=0)
    with pytest.raises(TypeError):
        store.lock("k", wait=object())


def test_durations_as_the_cli_takes_them():
    assert baton.parse_duration("500ms") == 0.5
    assert baton.parse_duration("1m30s") == 90
    assert baton.parse_duration(2.5) == 2.5
    assert baton.parse_duration(3) == 3
    assert baton.parse_duration(datetime.timedelta(minutes=2)) == 120
    with pytest.raises(baton.InvalidInputError):
        baton.parse_duration("1m30")


def test_status_of_an_unknown_key_is_not_found(store, key):
    with pytest.raises(baton.NotFoundError):
        store.status(key)


def test_leader_is_the_holder_of_a_mutex(store, key):
    assert store.leader(key) is None
    with store.lock(key) as lease:
        leader = store.leader(key)
        assert leader["pid"] == os.getpid()
        assert leader["token"] == lease.token
        assert leader["holder"] == lease.holder
    assert store.leader(key) is None
    with store.lock(key + "-pool", slots=2):
        with pytest.raises(baton.LimitMismatchError):
            store.leader(key + "-pool")


def test_keys_lists_what_was_used(store, key):
    with store.lock(key):
        pass
    assert key in store.keys()


def test_resize_where_the_store_can(store, key, kind):
    with store.lock(key, slots=2):
        pass
    if not store.capabilities["resize"]:
        with pytest.raises(baton.UnsupportedError):
            store.resize(key, 3)
        return
    assert store.resize(key, 3)["limit"] == 3
    with store.lock(key, slots=3):
        pass
    with pytest.raises(baton.LimitMismatchError):
        store.lock(key, slots=2, wait=0).acquire()
    # A step, applied to the store's limit; never below 1.
    assert store.resize(key, by=2)["limit"] == 5
    assert store.resize(key, by=-4)["limit"] == 1
    with pytest.raises(baton.InvalidInputError):
        store.resize(key, by=-1)
    assert store.status(key)["limit"] == 1
    for bad in [dict(), dict(limit=3, by=1), dict(by=0)]:
        with pytest.raises(ValueError):
            store.resize(key, **bad)


def test_delete_where_the_store_can(store, key, kind):
    with store.lock(key, slots=2):
        if not store.capabilities["delete"]:
            with pytest.raises(baton.UnsupportedError):
                store.delete(key)
            return
        with pytest.raises(baton.BusyError):
            store.delete(key)
    store.delete(key)
    assert key not in store.keys()
    with pytest.raises(baton.NotFoundError):
        store.delete(key)
    with store.lock(key, slots=3) as held:
        assert store.status(key)["limit"] == 3
        assert held.token > 0


def test_unavailable_store():
    store = baton.open("postgres://nobody@127.0.0.1:1/none?timeout=2s")
    with pytest.raises(baton.UnavailableError) as e:
        store.lock("k", wait=0).acquire()
    assert e.value.retryable


def test_corrupt_state_is_reported(tmp_path, key):
    store = baton.open(f"dir:{tmp_path}/locks")
    with store.lock(key):
        pass
    (tmp_path / "locks" / key.replace("/", "%") / "limit").write_text("garbage\n")
    with pytest.raises(baton.CorruptError):
        baton.open(f"dir:{tmp_path}/locks").lock(key, wait=0).acquire()


def test_messages_are_the_cli_line(tmp_path, key):
    cli = os.environ.get("BATON_CLI")
    if not cli:
        if os.environ.get("CI") == "true":
            pytest.fail("BATON_CLI is not set (scripts/test-python sets it)")
        pytest.skip("BATON_CLI is not set: no baton binary to compare messages with")
    url = f"dir:{tmp_path}/locks"
    store = baton.open(url)
    with store.lock(key):
        with pytest.raises(baton.BusyError) as e:
            store.lock(key, wait=0).acquire()
        run = subprocess.run(
            [cli, "run", "--no-wait", "-k", key, "-s", url, "--", "true"],
            capture_output=True,
            text=True,
        )
    assert run.returncode == 75
    assert run.stderr.strip() == f"baton: {e.value}"


def test_barrier_passes_when_all_parties_arrive(store, key):
    import threading

    if not store.capabilities["barrier"]:
        with pytest.raises(baton.UnsupportedError):
            store.barrier(key, parties=2, wait="1s")
        return
    results = []

    def party():
        results.append(store.barrier(key, parties=3, wait="30s"))

    threads = [threading.Thread(target=party) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["generation"] for r in results] == [0, 0, 0]
    with pytest.raises(baton.TimeoutError):
        store.barrier(key, parties=2, wait="300ms")


def test_the_default_store_is_the_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("BATON_STORE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    store = baton.open()
    assert store.url.startswith("dir:")
    with store.lock("default-store-test"):
        assert (tmp_path / "baton").is_dir()


def test_one_lock_shared_by_threads_and_nested(store, key):
    import threading

    pool = store.lock(key, slots=3, wait="60s")
    with pool as outer:
        with pool as inner:
            assert outer.token != inner.token and store.status(key)["held"] == 2
        assert not inner.held and outer.held
    assert not outer.held

    seen = []

    def worker():
        for _ in range(10):
            with pool as lease:
                assert lease.held
                seen.append(lease.token)
            assert not lease.held

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 40
    assert store.status(key)["held"] == 0


def test_a_lock_never_sees_another_locks_leases(store, key):
    """Leases released directly (not through their Lock) must not be found by a later
    Lock, even one that reuses the first one's memory."""
    import gc

    for _ in range(50):
        store.lock(key, wait=0).acquire().release()
        gc.collect()
        with pytest.raises(RuntimeError):
            store.lock(key).release()
    with store.lock(key, wait=0) as lease:
        assert lease.held
