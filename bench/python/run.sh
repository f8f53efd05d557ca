#!/usr/bin/env bash
# The Python package's benchmark: builds the package and the CLI in release mode, installs
# the package, fasteners and filelock into a venv under target/, and runs bench_locks.py.
# Extra arguments go to bench_locks.py (--rounds, --ops, --spawn-ops).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/python-bench-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
MATURIN_PEP517_ARGS="--profile release" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --force-reinstall --no-deps ./crates/baton-py
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check fasteners filelock
cargo build --quiet --release -p baton-cli
exec "$venv/bin/python" bench/python/bench_locks.py --baton "$PWD/target/release/baton" "$@"
