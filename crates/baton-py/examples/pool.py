"""A pool of 4 slots shared by asyncio tasks (and by every other process using the key):
at most 4 jobs run at once across all of them, and the loop never blocks while waiting.

    python pool.py --jobs 10
"""

import argparse
import asyncio

import baton


async def job(pool, i, running):
    async with pool as lease:
        running.add(i)
        print(f"job {i}: slot {lease.slot}, token {lease.token}, running {sorted(running)}")
        await asyncio.sleep(0.2)  # the work
        running.discard(i)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None)
    ap.add_argument("--jobs", type=int, default=10)
    args = ap.parse_args()
    store = baton.open(args.store)
    pool = store.lock("gpu-pool", slots=4, wait="10m")
    running = set()
    await asyncio.gather(*(job(pool, i, running) for i in range(args.jobs)))
    print(store.status("gpu-pool")["held"], "held after all jobs")


if __name__ == "__main__":
    asyncio.run(main())
