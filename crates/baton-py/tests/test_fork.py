"""A forked child does not inherit a held lease: its copy is inert (never releases, never
renews), and on kernel locks it does not keep the parent's lock alive."""

import os
import sys

import pytest

import baton
from conftest import python


def fork_and_report(fn):
    """Runs fn() in a forked child; returns its exit status (0: every check held)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() else 2
        except BaseException as e:  # report anything, never run the parent's code on
            print(f"child: {e!r}", file=sys.stderr)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_childs_copy_is_inert(kind, store, key):
    with store.lock(key) as lease:

        def child():
            assert lease.lost and not lease.held
            lease.release()  # does nothing: the parent holds it
            if kind == "zk":
                # A ZooKeeper store cannot be reopened in a forked child: the client's I/O
                # reactor (async-io) is process-wide and its thread stays in the parent
                # (crates/baton-store-zk/README.md). The store says so at once.
                try:
                    store.lock(key + "-child", wait=0).acquire()
                    return False
                except baton.UnavailableError as e:
                    return "forked child" in str(e)
            # The child's own store (reopened after the fork) sees the parent's lock.
            try:
                store.lock(key, wait=0).acquire()
                return False
            except baton.BusyError:
                pass
            with store.lock(key + "-child", wait=0) as mine:  # and works for its own keys
                return mine.token > 0 and not mine.lost

        assert fork_and_report(child) == 0
        assert not lease.lost and lease.held
        st = store.status(key)
        assert st["held"] == 1 and st["holders"][0]["pid"] == os.getpid()
        with pytest.raises(baton.BusyError):
            store.lock(key, wait=0).acquire()
    # Released by the parent, without LostError: the child touched nothing.


def test_a_forked_child_does_not_keep_a_kernel_lock_alive(tmp_path, key):
    url = f"dir:{tmp_path}/locks"
    # The holder forks a child that outlives it, then exits without releasing.
    holder = python(
        """
        import os, sys, time, baton
        store = baton.open(sys.argv[1])
        lease = store.lock(sys.argv[2]).acquire()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:             # fork's after-in-child hooks have run by now
            os.write(w, b"x")
            time.sleep(300)        # outlives the holder; the test kills it
            os._exit(0)
        os.read(r, 1)
        print(lease.token, child, flush=True)
        sys.stdin.readline()
        os._exit(0)                # no release: the kernel drops the holder's lock
        """,
        url,
        key,
    )
    token, child = map(int, holder.stdout.readline().split())
    try:
        holder.stdin.write("exit\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
        os.kill(child, 0)  # the forked child still runs, with its copy of the memory
        with baton.open(url).lock(key, wait=0) as lease:
            assert lease.token > token
    finally:
        os.kill(child, 9)
        holder.stdout.close()
