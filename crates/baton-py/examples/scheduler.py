"""A scheduler that runs as a singleton, with standbys that take over when it dies.

Start it in several terminals: one leads, the others wait as standbys; kill the leader
(even with SIGKILL) and a standby takes over -- at once on the directory store, within the
TTL on a lease store. `--who` says who leads.

    python scheduler.py --store sqlite:/tmp/sched.db          # leader or standby
    python scheduler.py --store sqlite:/tmp/sched.db --who    # who leads
"""

import argparse
import os
import threading
import time

import baton


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None)
    ap.add_argument("--who", action="store_true")
    ap.add_argument("--ticks", type=int, default=0, help="lead this many ticks, then resign (0: forever)")
    args = ap.parse_args()
    store = baton.open(args.store)

    if args.who:
        leader = store.leader("scheduler")
        if leader is None:
            print("no leader")
        else:
            print(f"leader: pid {leader['pid']} on {leader['host']}, token {leader['token']}, "
                  f"since {time.ctime(leader['since'])}")
        return

    print(f"pid {os.getpid()}: standing by", flush=True)
    stop = threading.Event()
    with store.lock("scheduler", ttl="10s") as lease:  # waits as long as it takes
        lease.on_lost(stop.set)  # a lease store's keeper could not renew: stop at once
        print(f"pid {os.getpid()}: leading with token {lease.token}", flush=True)
        tick = 0
        while not stop.is_set() and (args.ticks == 0 or tick < args.ticks):
            tick += 1
            # ... schedule work, passing lease.token to whatever it writes ...
            stop.wait(1)
    print(f"pid {os.getpid()}: resigned", flush=True)


if __name__ == "__main__":
    main()
