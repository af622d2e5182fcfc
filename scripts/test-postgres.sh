#!/usr/bin/env bash
# The database-only tests again on PostgreSQL (the scale-out database), when one answers.
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${VMBACKUP_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/vmbackup}
if ! .venv/bin/python - "$URL" <<'PY' 2>/dev/null
import sys
from urllib.parse import urlparse

import psycopg

u = urlparse(sys.argv[1])
psycopg.connect(host=u.hostname, port=u.port or 5432, user=u.username, dbname="postgres",
                password=u.password or None, connect_timeout=3).close()
PY
then
  echo "test-postgres: no PostgreSQL at ${URL%%@*}@…; skipped"
  exit 0
fi
echo "test-postgres: database tests on PostgreSQL"
# Left to the SQLite pass: tests whose time goes to real restic, sshd, gunicorn and
# service restarts (two thirds of this pass), while their queries are the plain ones the
# tests kept here already run on PostgreSQL.
EXTERNAL=(test_restic.py test_restic_sftp.py test_offsite_check.py test_offsite_failures.py
          test_offsite_forget.py test_offsite_import.py test_offsite_verified.py
          test_deploy.py test_run_stop.py)
DATABASE_URL=$URL .venv/bin/pytest -q -m "not libvirt" -p no:cacheprovider \
  "${EXTERNAL[@]/#/--ignore=tests/}"
