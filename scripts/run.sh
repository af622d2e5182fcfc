#!/usr/bin/env bash
# Start the dashboard, one django-q2 cluster and the live inventory (libvirt events) on the
# embedded default (SQLite + ORM broker).
set -euo pipefail
cd "$(dirname "$0")/.."
ADDR=${1:-127.0.0.1:8000}
DEMO=${2:-0}
PY=.venv/bin/python
export VMBACKUP_ROOT=${VMBACKUP_ROOT:-/var/backups/vms}
# A root made here is search-only (QEMU passes through it to write push targets); one
# that exists keeps its mode. Below it everything is private (manage.py sets umask 077).
[ -d "$VMBACKUP_ROOT" ] || mkdir -p -m 0711 "$VMBACKUP_ROOT"

$PY manage.py migrate --noinput >/dev/null
$PY manage.py createcachetable >/dev/null
$PY manage.py collectstatic --noinput >/dev/null
$PY manage.py vmbackup_admin_user
$PY manage.py vmbackup_schedules >/dev/null
$PY manage.py vmbackup_reconcile || true
[ "$DEMO" = 1 ] && $PY manage.py vmbackup_demo
$PY manage.py vmbackup_sync || echo "run: inventory sync failed (see above); the dashboard still starts"

# The servers run in the background, each in a process group of its own (set -m), and the
# script waits for them: bash runs a trap only between commands, so a foreground runserver
# kept a TERM to this script pending until it ended by itself, and Ctrl-C reached the
# cluster twice (the terminal's SIGINT to every process, then the trap's SIGTERM: it logged
# "stopping." twice and hung). Now a stop (Ctrl-C, TERM, HUP, or the web or the cluster
# ending) sends one SIGTERM to each server's main process, as systemd's KillMode=mixed does, waits up to
# VMBACKUP_STOP_TIMEOUT seconds for their groups to empty, then SIGKILLs what is left (a
# bound in case anything hangs); a run killed that way is found by reconcile.
# vmbackup_events (the live inventory) is stopped with them; its end alone stops nothing
# (the 15-minute sync stays): it says why on the terminal.
STOP_TIMEOUT=${VMBACKUP_STOP_TIMEOUT:-20}
set -m
$PY manage.py qcluster &
QPID=$!
$PY manage.py runserver --noreload "$ADDR" &
WPID=$!
$PY manage.py vmbackup_events &
EPID=$!
set +m

group_alive() { # a process of group $1 that is not a zombie
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

stop() {
  trap '' INT TERM HUP
  kill -TERM "$WPID" "$QPID" "$EPID" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ] &&
    { group_alive "$WPID" || group_alive "$QPID" || group_alive "$EPID"; }; do
    sleep 0.2
  done
  for group in "$WPID" "$QPID" "$EPID"; do
    if group_alive "$group"; then
      echo "run: $group still running after ${STOP_TIMEOUT}s: killed" >&2
      kill -KILL -- "-$group" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop; exit 129' HUP
echo "run: dashboard at http://$ADDR/ (Ctrl-C stops it, the worker and the live inventory)"
status=0
wait -n "$WPID" "$QPID" || status=$?
echo "run: a server ended (status $status); stopping the other" >&2
stop
exit "$status"
