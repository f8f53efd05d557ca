#!/usr/bin/env bash
# Side-by-side benchmarks of baton. See bench/README.md.
#
#   bash bench/run.sh           the full run (~5 minutes): Markdown report on stdout
#   bash bench/run.sh --quick   a few seconds, every code path; fails on a violation
#
# Raw results go to bench/results/*.jsonl, the report also to bench/results/*.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
case "${1:-}" in
  --quick) quick=(--quick) ;;
  "") ;;
  *) echo "usage: bash bench/run.sh [--quick]" >&2; exit 2 ;;
esac

log() { echo "run.sh: $*" >&2; }

# Python peers: fasteners and filelock in a venv at bench/.venv (else the user site).
py=bench/.venv/bin/python
if ! "$py" -c 'import fasteners, filelock' 2>/dev/null; then
  if python3 -m venv bench/.venv >/dev/null 2>&1; then
    log "installing fasteners and filelock into bench/.venv"
    bench/.venv/bin/pip install -q fasteners filelock >&2
  else
    log "no venv support; installing fasteners and filelock into the user site"
    python3 -m pip install -q --user fasteners filelock >&2
    py=$(command -v python3)
  fi
fi

# The PostgreSQL peer needs psycopg (3) beside them.
if ! "$py" -c 'import psycopg' 2>/dev/null; then
  log "installing psycopg for the PostgreSQL peer"
  if [ "$py" = bench/.venv/bin/python ]; then
    bench/.venv/bin/pip install -q "psycopg[binary]" >&2
  else
    python3 -m pip install -q --user "psycopg[binary]" >&2
  fi
fi

# The etcd peer: python-etcd3, whose generated code needs protobuf 3 (read by the
# pure-Python runtime).
if ! PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python "$py" -c 'import etcd3' 2>/dev/null; then
  log "installing etcd3 (with protobuf<4) for the etcd peer"
  if [ "$py" = bench/.venv/bin/python ]; then
    bench/.venv/bin/pip install -q etcd3 'protobuf<4' >&2 || log "cannot install etcd3: the etcd peer is skipped"
  else
    python3 -m pip install -q --user etcd3 'protobuf<4' >&2 || log "cannot install etcd3: the etcd peer is skipped"
  fi
fi

# The Redis peers: redis-py (redis.lock.Lock) and python-redis-lock. The server itself
# comes from scripts/server-redis, started by baton-bench when BATON_TEST_REDIS is unset.
if ! "$py" -c 'import redis, redis_lock' 2>/dev/null; then
  log "installing redis and python-redis-lock for the Redis peers"
  if [ "$py" = bench/.venv/bin/python ]; then
    bench/.venv/bin/pip install -q redis python-redis-lock >&2 || log "cannot install redis: the Redis peers are skipped"
  else
    python3 -m pip install -q --user redis python-redis-lock >&2 || log "cannot install redis: the Redis peers are skipped"
  fi
fi

# The ZooKeeper peer: kazoo. The server comes from scripts/server-zookeeper, started by
# baton-bench when BATON_TEST_ZK is unset.
if ! "$py" -c 'import kazoo' 2>/dev/null; then
  log "installing kazoo for the ZooKeeper peer"
  if [ "$py" = bench/.venv/bin/python ]; then
    bench/.venv/bin/pip install -q kazoo >&2 || log "cannot install kazoo: the ZooKeeper peer is skipped"
  else
    python3 -m pip install -q --user kazoo >&2 || log "cannot install kazoo: the ZooKeeper peer is skipped"
  fi
fi

# The RabbitMQ peer: pika (the 2014 blog's token-message semaphore). The broker comes from
# scripts/server-rabbitmq, started by baton-bench when BATON_TEST_AMQP is unset.
if ! "$py" -c 'import pika' 2>/dev/null; then
  log "installing pika for the RabbitMQ peer"
  if [ "$py" = bench/.venv/bin/python ]; then
    bench/.venv/bin/pip install -q pika >&2 || log "cannot install pika: the RabbitMQ peer is skipped"
  else
    python3 -m pip install -q --user pika >&2 || log "cannot install pika: the RabbitMQ peer is skipped"
  fi
fi

# flock(1) is util-linux; strace is optional (the syscall table is skipped without it).
apt_updated=
apt_install() {
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || return 1
  [ -n "$apt_updated" ] || { apt-get update -qq >&2; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v flock >/dev/null || apt_install util-linux || { log "flock(1) is missing"; exit 1; }
command -v strace >/dev/null || apt_install strace || log "strace missing: no syscall table"

cargo build --release -q -p baton-cli -p baton-bench >&2

mkdir -p bench/results
mode=full
[ ${#quick[@]} -eq 0 ] || mode=quick
report="bench/results/$(date -u +%Y%m%dT%H%M%SZ)-$mode-report.md"
start=$(date +%s)
target/release/baton-bench run "${quick[@]}" \
  --baton target/release/baton \
  --python "$py" \
  --peers bench/peers \
  --results bench/results | tee "$report"
log "done in $(( $(date +%s) - start )) s; report saved to $report"
