"""A wait cancelled by a signal (KeyboardInterrupt) or by asyncio leaves nothing queued:
status shows no waiter, and the next acquire is granted at once.

The cancel is the Rust library's (the acquire future is dropped before the exception
reaches Python). SQLite, PostgreSQL and etcd finish removing the withdrawn waiter just
after the drop, on their own threads, so the first check waits for the queue to empty;
then the holder releases and nothing may be left: no holder, no waiter, and a no-wait
acquire granted at once (a ghost waiter would be ahead of it in the FIFO queue, or would
hold the slot)."""

import asyncio
import os
import signal
import threading

import pytest

from conftest import eventually, python, wait_for_waiter, waiters


def check_nothing_left(store, key, holder):
    eventually(lambda: waiters(store, key) in (0, None), "the withdrawn waiter leaves the queue")
    holder.release()
    st = store.status(key)
    assert st["held"] == 0 and st["waiters"] in (0, None), st
    # Granted at once: a queued ghost would be ahead of it on the FIFO stores, and would
    # hold the lock on the others.
    again = store.lock(key, wait=0).acquire()
    again.release()
    assert store.status(key)["held"] == 0


def test_ctrl_c_cancels_a_sync_wait(store, key):
    holder = store.lock(key).acquire()

    def interrupt():
        wait_for_waiter(store, key)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        store.lock(key).acquire()  # waits forever, but for the signal
    t.join()
    check_nothing_left(store, key, holder)


def test_sigint_cancels_a_wait_in_another_process(store, url, key):
    holder = store.lock(key).acquire()
    child = python(
        """
        import sys, baton
        store = baton.open(sys.argv[1])
        print("waiting", flush=True)
        try:
            store.lock(sys.argv[2]).acquire()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """,
        url,
        key,
    )
    assert child.stdout.readline().strip() == "waiting"
    wait_for_waiter(store, key)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 3, err
    assert out.strip() == "interrupted"
    check_nothing_left(store, key, holder)


def test_asyncio_cancellation_cancels_a_wait(store, key):
    holder = store.lock(key).acquire()

    async def main():
        task = asyncio.ensure_future(store.lock(key).acquire_async())
        await asyncio.get_running_loop().run_in_executor(None, wait_for_waiter, store, key)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 120))
    check_nothing_left(store, key, holder)


def test_asyncio_timeout_cancels_a_wait(store, key):
    holder = store.lock(key).acquire()

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5) if hasattr(asyncio, "timeout") else _Timeout(0.5):
                async with store.lock(key):
                    pass

    asyncio.run(main())
    check_nothing_left(store, key, holder)


class _Timeout:
    """asyncio.timeout for Python < 3.11."""

    def __init__(self, delay):
        self.delay = delay

    async def __aenter__(self):
        task = asyncio.current_task()
        self.handle = asyncio.get_running_loop().call_later(self.delay, task.cancel)

    async def __aexit__(self, et, e, tb):
        self.handle.cancel()
        if et is asyncio.CancelledError:
            raise asyncio.TimeoutError
