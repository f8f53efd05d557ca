"""The same Lock objects under asyncio: waits never block the loop."""

import asyncio

import pytest

import baton


def run(coro):
    # A liveness bound only (a broken build must not hang the run), never a pass/fail time.
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_async_with_grants_a_lease(store, key):
    async def main():
        async with store.lock(key) as lease:
            assert lease.key == key and lease.token > 0
            assert store.status(key)["held"] == 1
        return lease

    lease = run(main())
    assert lease.held is False
    assert store.status(key)["held"] == 0


def test_a_wait_does_not_block_the_loop(store, key):
    holder = store.lock(key).acquire()

    async def main():
        waiter = asyncio.ensure_future(store.lock(key, wait="60s").acquire_async())
        ticks = 0
        for _ in range(10):  # the loop runs while the acquire waits
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 10 and not waiter.done()
        await holder.release_async()
        lease = await waiter
        assert lease.token > holder.token
        await lease.release_async()

    run(main())


def test_a_pool_of_4_shared_by_tasks(store, key):
    pool = store.lock(key, slots=4, wait="60s")
    inside = 0
    most = 0
    tokens = []

    async def job(i):
        nonlocal inside, most
        async with pool as lease:
            inside += 1
            most = max(most, inside)
            tokens.append(lease.token)
            await asyncio.sleep(0.01)
            inside -= 1

    async def main():
        await asyncio.gather(*(job(i) for i in range(12)))

    run(main())
    assert most <= 4
    assert len(set(tokens)) == 12
    assert store.status(key)["held"] == 0


def test_async_errors_are_the_same_classes(store, key):
    async def main():
        with store.lock(key):
            with pytest.raises(baton.BusyError):
                await store.lock(key, wait=0).acquire_async()
            with pytest.raises(baton.TimeoutError):
                async with store.lock(key, wait="200ms"):
                    pass

    run(main())


def test_async_barrier(store, key):
    if not store.capabilities["barrier"]:
        with pytest.raises(baton.UnsupportedError):
            run(store.barrier_async(key, 2, wait="1s"))
        return

    async def main():
        return await asyncio.gather(
            store.barrier_async(key, 2, wait="30s"),
            store.barrier_async(key, 2, wait="30s"),
        )

    a, b = run(main())
    assert a["generation"] == b["generation"] == 0
