#!/usr/bin/env bash
# Start the dashboard and one django-q2 cluster on the embedded default (SQLite + ORM broker).
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

$PY manage.py qcluster &
QPID=$!
trap 'kill $QPID 2>/dev/null; wait $QPID 2>/dev/null' EXIT INT TERM
echo "run: dashboard at http://$ADDR/ (Ctrl-C stops it and the worker)"
$PY manage.py runserver --noreload "$ADDR"
