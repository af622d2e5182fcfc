#!/usr/bin/env bash
# Install vmbackup as a service, or upgrade an installation from a newer tree.
#
#   scripts/install.sh [--prefix DIR] [--unit-dir DIR] [--conf-dir DIR] [--data-dir DIR]
#                      [--user NAME] [--no-user] [--python PATH] [--no-systemd]
#                      [--systemctl PATH]
#
# Defaults: the app in /opt/vmbackup (a copy of this tree, not a link: the tree you install
# from may change or go away), units in /etc/systemd/system, settings in
# /etc/vmbackup/vmbackup.env (written once from deploy/vmbackup.env.example, never
# overwritten), data in /var/lib/vmbackup owned by the system user `vmbackup` (0700). The web
# unit runs as that user; only the worker runs as root. --no-user uses an existing user
# instead of creating one; --no-systemd leaves systemctl alone (tests install into
# temporary directories with these options; --systemctl names the systemctl to drive, and
# systemd is then taken to be running).
#
# Idempotent: a second run with the same tree changes nothing (the copy and the venv are
# compared first; migrate, collectstatic and the schedules do nothing when nothing changed).
# Where systemd is not PID 1 the units are installed but not enabled, and it says so.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/vmbackup
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/vmbackup
DATA_DIR=/var/lib/vmbackup
USER_NAME=vmbackup
CREATE_USER=1
PYTHON=/usr/bin/python3
USE_SYSTEMD=1
SYSTEMCTL=""
UNITS=(vmbackup-web.service vmbackup-worker.service vmbackup-worker@.service
  vmbackup-events.service vmbackup-events@.service)

log() { echo "install: $*"; }
die() {
  echo "install: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --unit-dir) UNIT_DIR=$2; shift 2 ;;
    --conf-dir) CONF_DIR=$2; shift 2 ;;
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --user) USER_NAME=$2; shift 2 ;;
    --no-user) CREATE_USER=0; shift ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-systemd) USE_SYSTEMD=0; shift ;;
    --systemctl) SYSTEMCTL=$2; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and root-owned files)"
ENV_FILE=$CONF_DIR/vmbackup.env

# --- Python: one the unprivileged user can execute. A venv points at the interpreter it was
# made from; one made from a Python under /root (pyenv, a build in a home) does not start
# for the web user. Debian's /usr/bin/python3 is world-executable.
# Debian packages: the venv module, rsync for the copy, and what pip needs to build
# libvirt-python against Debian's Python (headers, libvirt's, a compiler).
missing=()
for pkg in python3-venv python3-dev libvirt-dev pkg-config gcc rsync; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$PYTHON" ] || die "no Python at $PYTHON (--python PATH)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  die "$PYTHON is $("$PYTHON" --version 2>&1), vmbackup needs Python 3.11"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || die "$PYTHON has no venv module"

# --- The system user (its home is the data dir; it has no shell).
if ! getent passwd "$USER_NAME" >/dev/null; then
  [ "$CREATE_USER" = 1 ] || die "no user $USER_NAME (--no-user: it must exist)"
  useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
    --shell /usr/sbin/nologin --comment "vmbackup dashboard" "$USER_NAME"
  log "created system user $USER_NAME"
fi
GROUP=$(id -gn "$USER_NAME")
runuser -u "$USER_NAME" -- "$PYTHON" -c 'pass' ||
  die "$USER_NAME cannot run $PYTHON (is it under a private directory?)"

# --- Settings: written once; a secret key generated once (both readable by the web user).
install -d -m 0750 -o root -g "$GROUP" "$CONF_DIR"
if [ ! -e "$ENV_FILE" ]; then
  sed -e "s|^VMBACKUP_DATA_DIR=.*|VMBACKUP_DATA_DIR=$DATA_DIR|" \
    -e "s|/etc/vmbackup/|$CONF_DIR/|g" "$SRC/deploy/vmbackup.env.example" >"$ENV_FILE.new"
  chown "root:$GROUP" "$ENV_FILE.new" && chmod 0640 "$ENV_FILE.new"
  mv "$ENV_FILE.new" "$ENV_FILE"
  log "wrote $ENV_FILE: set ALLOWED_HOSTS, CSRF_TRUSTED_ORIGINS and VMBACKUP_URL to your name"
fi
if [ ! -e "$CONF_DIR/secret_key" ]; then
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(50))' >"$CONF_DIR/secret_key")
  chown "root:$GROUP" "$CONF_DIR/secret_key" && chmod 0640 "$CONF_DIR/secret_key"
  log "generated $CONF_DIR/secret_key"
fi

# The env file as systemd reads it: KEY=value lines, comments and blanks skipped, one pair
# of surrounding quotes removed. Commands below get exactly this environment.
ENV_ARGS=(PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8)
while IFS= read -r line || [ -n "$line" ]; do
  line=${line#"${line%%[![:space:]]*}"}
  case "$line" in "" | "#"* | ";"*) continue ;; esac
  key=${line%%=*} value=${line#*=}
  case "$value" in \"*\" | \'*\') value=${value:1:${#value}-2} ;; esac
  ENV_ARGS+=("$key=$value")
  [ "$key" = VMBACKUP_DATA_DIR ] && DATA_DIR=$value
done <"$ENV_FILE"

# --- What changes: the tree (compared by rsync), the venv (Python + requirements stamp).
EXCLUDES=(--exclude=/.git --exclude=/.venv --exclude=/var/ --exclude=__pycache__
  --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.sqlite3*')
RSYNC=(rsync -rlptogO --delete --chown=root:root --chmod=go+rX,go-w "${EXCLUDES[@]}")
FIRST=1
[ -e "$PREFIX/manage.py" ] && FIRST=0
if [ "$SRC" = "$PREFIX" ]; then
  tree_changes=""
else
  tree_changes=$("${RSYNC[@]}" --dry-run --itemize-changes "$SRC/" "$PREFIX/" || true)
fi
stamp="python=$(readlink -f "$PYTHON") requirements=$(sha256sum "$SRC/requirements.txt" | cut -c1-16)"
venv_stamp=$(cat "$PREFIX/.venv/.vmbackup-stamp" 2>/dev/null || true)
CHANGED=0
if [ -n "$tree_changes" ] || [ "$stamp" != "$venv_stamp" ]; then CHANGED=1; fi

systemd_up() { [ "$USE_SYSTEMD" = 1 ] && { [ -n "$SYSTEMCTL" ] || [ -d /run/systemd/system ]; }; }
systemctl() { "${SYSTEMCTL:-/usr/bin/systemctl}" "$@"; }

# --- Upgrade order. The worker (and the live inventory beside it) stops first: no job may
# run while its code and schema are replaced (one in flight is interrupted, and reconcile -
# the worker's ExecStartPre - repairs it at the next start). Then the web, so no request writes with the old code into
# the new schema (nor holds SQLite's lock while migrate runs). Copy, venv, migrate and
# collectstatic run with both stopped; the web starts first (the worker units are ordered
# after it) and the workers last, so it takes queued jobs only with the new code and schema.
running_workers=()
if [ "$FIRST" = 0 ] && [ "$CHANGED" = 1 ] && systemd_up; then
  mapfile -t running_workers < <(systemctl list-units --state=active --plain --no-legend \
    'vmbackup-worker.service' 'vmbackup-worker@*.service' \
    'vmbackup-events.service' 'vmbackup-events@*.service' | awk '{print $1}')
  web_was_active=$(systemctl is-active vmbackup-web.service || true)
  log "upgrade: stopping ${running_workers[*]:-no worker}, then the web"
  [ ${#running_workers[@]} -gt 0 ] && systemctl stop "${running_workers[@]}"
  systemctl stop vmbackup-web.service
fi

# --- The copy (root-owned, readable by all: the web user runs it but cannot change it).
install -d -m 0755 "$PREFIX"
if [ -n "$tree_changes" ]; then
  "${RSYNC[@]}" "$SRC/" "$PREFIX/"
  log "copied $(printf '%s\n' "$tree_changes" | grep -c .) changed paths into $PREFIX"
fi

# --- The venv, from $PYTHON; remade when the Python changed, refreshed when requirements did.
if [ "$stamp" != "$venv_stamp" ]; then
  if [ -x "$PREFIX/.venv/bin/python" ] &&
    [ "$("$PREFIX/.venv/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null |
      xargs readlink -f)" != "$(readlink -f "$PYTHON")" ]; then
    rm -rf "$PREFIX/.venv"
  fi
  [ -x "$PREFIX/.venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/.venv"
  log "installing Python requirements into $PREFIX/.venv"
  "$PREFIX/.venv/bin/pip" install -q --disable-pip-version-check -r "$PREFIX/requirements.txt"
  echo "$stamp" >"$PREFIX/.venv/.vmbackup-stamp"
fi

# --- Bytecode, written once here: the web user cannot write into the root-owned tree, and
# without it every process start (each command, each gunicorn worker) compiles the project.
if [ -n "$tree_changes" ] || [ "$stamp" != "$venv_stamp" ]; then
  "$PREFIX/.venv/bin/python" -m compileall -q "$PREFIX/manage.py" "$PREFIX/vmbackup_site" \
    "$PREFIX/backups" >/dev/null
fi

# --- The data dir: the web user's, 0700. The root worker reaches it anyway (root is not
# subject to file modes), and SQLite gives files it creates as root the database's owner.
# Files someone made here as root (manage.py run by hand) are handed back to the user.
install -d -m 0700 -o "$USER_NAME" -g "$GROUP" "$DATA_DIR"
strays=$(find "$DATA_DIR" \( ! -user "$USER_NAME" -o ! -group "$GROUP" \) -print | wc -l)
if [ "$strays" != 0 ]; then
  chown -R "$USER_NAME:$GROUP" "$DATA_DIR"
  log "gave $strays files in $DATA_DIR back to $USER_NAME"
fi

# --- Database and static files, as the web user (what it makes is its own).
as_user() {
  (cd "$PREFIX" && runuser -u "$USER_NAME" -- env -i "${ENV_ARGS[@]}" \
    "$PREFIX/.venv/bin/python" manage.py "$@")
}
# Each step's output is shown only when it did something (FILTER: what "nothing" reads as).
step() {
  local filter=$1 out
  shift
  out=$(as_user "$@" 2>&1) || {
    printf '%s\n' "$out" >&2
    die "manage.py $* failed"
  }
  printf "%s\n" "$out" | grep -vE "^$|$filter" || true
}
step "^(Operations to perform:|  Apply all migrations:|Running migrations:|  No migrations to apply\.)" \
  migrate --noinput
step "^($|Cache table .* already exists\.)" createcachetable
step "^0 static files copied" collectstatic --noinput
step "." vmbackup_schedules
step "exists; its password was shown" vmbackup_admin_user

# --- Units, with this installation's paths and user.
units_changed=0
install -d -m 0755 "$UNIT_DIR"
for unit in "${UNITS[@]}"; do
  sed -e "s|/opt/vmbackup|$PREFIX|g" -e "s|/etc/vmbackup/|$CONF_DIR/|g" \
    -e "s|^User=vmbackup$|User=$USER_NAME|" -e "s|^Group=vmbackup$|Group=$GROUP|" \
    "$SRC/deploy/$unit" >"$UNIT_DIR/.$unit.new"
  if cmp -s "$UNIT_DIR/.$unit.new" "$UNIT_DIR/$unit"; then
    rm "$UNIT_DIR/.$unit.new"
  else
    chmod 0644 "$UNIT_DIR/.$unit.new" && mv "$UNIT_DIR/.$unit.new" "$UNIT_DIR/$unit"
    units_changed=1
    log "wrote $UNIT_DIR/$unit"
  fi
done

if ! systemd_up; then
  if [ "$USE_SYSTEMD" = 0 ]; then
    why="--no-systemd"
  else
    why="systemd is not running here (PID 1 is $(ps -p 1 -o comm= 2>/dev/null || echo unknown))"
  fi
  log "$why: units installed in $UNIT_DIR, not enabled or started."
  log "on a host booted with systemd: systemctl daemon-reload &&" \
    "systemctl enable --now vmbackup-web vmbackup-worker vmbackup-events"
  log "done ($PREFIX)"
  exit 0
fi
[ "$units_changed" = 1 ] && systemctl daemon-reload
if [ "$FIRST" = 1 ]; then
  systemctl enable --now vmbackup-web.service
  systemctl enable --now vmbackup-worker.service
  systemctl enable --now vmbackup-events.service
  log "started vmbackup-web, vmbackup-worker and vmbackup-events"
elif [ "$CHANGED" = 1 ]; then
  [ "${web_was_active:-active}" = active ] && systemctl start vmbackup-web.service
  [ ${#running_workers[@]} -gt 0 ] && systemctl start "${running_workers[@]}"
  log "upgrade: started the web, then ${running_workers[*]:-no worker}"
fi
log "done ($PREFIX)"
