"""The README's examples, run for real."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name, *args, **kw):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=300, **kw,
    )


@pytest.mark.parametrize("kind", ["dir", "sqlite"])
def test_result_storm_records_every_result_once(tmp_path, kind):
    store = f"dir:{tmp_path}/locks" if kind == "dir" else f"sqlite:{tmp_path}/locks.db"
    r = example("result_storm.py", "--workers", "6", "--jobs", "60",
                "--db", str(tmp_path / "results.db"), "--store", store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "60 results from 6 workers; failed workers: 0; tokens increasing" in r.stdout


def test_pool_runs_at_most_4_at_once(tmp_path):
    r = example("pool.py", "--jobs", "10", "--store", f"sqlite:{tmp_path}/pool.db")
    assert r.returncode == 0, r.stderr
    running = [eval(m) for m in re.findall(r"running (\[[\d, ]*\])", r.stdout)]
    assert len(running) == 10 and max(len(x) for x in running) <= 4
    assert "0 held after all jobs" in r.stdout


def test_scheduler_standby_takes_over_from_a_killed_leader(tmp_path):
    store = f"dir:{tmp_path}/locks"
    cmd = [sys.executable, str(EXAMPLES / "scheduler.py"), "--store", store]
    leader = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    standby = None
    try:
        assert leader.stdout.readline().endswith("standing by\n")
        assert "leading with token" in leader.stdout.readline()
        who = example("scheduler.py", "--store", store, "--who")
        assert f"leader: pid {leader.pid} " in who.stdout
        standby = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert standby.stdout.readline().endswith("standing by\n")
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        assert "leading with token" in standby.stdout.readline()
        who = example("scheduler.py", "--store", store, "--who")
        assert f"leader: pid {standby.pid} " in who.stdout
    finally:
        for p in (leader, standby):
            if p is not None:
                p.kill()
                p.wait()
