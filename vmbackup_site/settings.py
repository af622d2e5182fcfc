"""Settings read from the environment; the defaults run as-is on one machine.

Every variable is listed in README.md's configuration table. Secrets may be given as
``NAME_FILE`` (a path whose content is the value), the usual container/systemd convention.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str | None = None) -> str | None:
    """The value of ``name``, or the content of the file named by ``name_FILE``."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        return Path(file_name).read_text().strip()
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = env(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def envint(name: str, default: int) -> int:
    value = env(name)
    return default if value in (None, "") else int(value)


def envlist(name: str, default: list[str]) -> list[str]:
    value = env(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DATA_DIR = Path(env("VMBACKUP_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
DATA_DIR.chmod(0o700)  # the database holds session keys: whoever reads it is the admin


def _secret_key() -> str:
    """A key given by the environment, else one generated once and kept in the data dir.

    Generating it at start would log every user out on each restart and break signed
    django-q2 task payloads between the web process and the workers.
    """
    given = env("SECRET_KEY")
    if given:
        return given
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = envbool("DEBUG", False)
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])

# What to back up and where.
VMBACKUP_LIBVIRT_URI = env("VMBACKUP_LIBVIRT_URI", "qemu:///system")
VMBACKUP_ROOT = env("VMBACKUP_ROOT", "/var/backups/vms")
# Every directory a policy may name as its destination (comma-separated); the worker writes,
# prunes and adopts nowhere else. VMBACKUP_ROOT is always one of them.
VMBACKUP_ROOTS = envlist("VMBACKUP_ROOTS", [VMBACKUP_ROOT])
# Accept libvirt's test:/// driver as a host URI (the test suite does; production never).
VMBACKUP_ALLOW_TEST_URI = envbool("VMBACKUP_ALLOW_TEST_URI", False)
# Restores queued or running at once per host; one more is refused until one ends.
VMBACKUP_MAX_RESTORES_PER_HOST = envint("VMBACKUP_MAX_RESTORES_PER_HOST", 2)
# instant recovery: the bandwidth of each disk's move, MiB/s (0: as fast as the disks go),
# so that the moving does not starve the restored VM of I/O
VMBACKUP_INSTANT_MOVE_MIB_S = envint("VMBACKUP_INSTANT_MOVE_MIB_S", 0)
# Restore drills: the scratch directory of their sandboxes (overlays over the backup, the
# console log; QEMU must reach it, so it is made search-only, 0711), the most memory one
# sandbox may have (a drill of a bigger VM is refused), and the timeout of a drill without
# a policy (a policy sets its own).
VMBACKUP_DRILL_DIR = env("VMBACKUP_DRILL_DIR", "/var/lib/libvirt/images/.vmbackup-drills")
VMBACKUP_DRILL_MEMORY_MIB = envint("VMBACKUP_DRILL_MEMORY_MIB", 4096)
VMBACKUP_DRILL_TIMEOUT = envint("VMBACKUP_DRILL_TIMEOUT", 300)
# Where each drill's evidence (screenshot, console lines) is kept, root's only (0700/0600);
# the dashboard shows the copy in the database.
VMBACKUP_DRILL_EVIDENCE_DIR = env("VMBACKUP_DRILL_EVIDENCE_DIR", str(DATA_DIR / "drills"))
# Directories the dashboard may restore into (comma-separated); a restore writes nowhere else.
VMBACKUP_RESTORE_ROOTS = envlist("VMBACKUP_RESTORE_ROOTS", ["/var/lib/libvirt/images"])
# Where external snapshot overlays are written (None: next to each disk).
VMBACKUP_OVERLAY_DIR = env("VMBACKUP_OVERLAY_DIR", "") or None
# Where full push-method backups put the NBD sockets they are pulled through (unix socket
# paths are short). Empty (default): /run/vmbackup when /run is writable, else fulls are
# pushed by QEMU like incrementals (and compressed afterwards when the policy asks).
VMBACKUP_NBD_DIR = env("VMBACKUP_NBD_DIR", "")
# The user libvirt runs QEMU as (qemu.conf "user"), who must reach the NBD socket directory.
VMBACKUP_QEMU_USER = env("VMBACKUP_QEMU_USER", "libvirt-qemu")
# Free space required where snapshot overlays go (a full overlay pauses the guest).
VMBACKUP_OVERLAY_RESERVE_MIB = envint("VMBACKUP_OVERLAY_RESERVE_MIB", 1024)
# Where libvirt keeps emulated TPM state (swtpm), one directory per domain UUID.
VMBACKUP_SWTPM_DIR = env("VMBACKUP_SWTPM_DIR", "/var/lib/libvirt/swtpm")
# A run whose heartbeat is older than this is considered dead by reconcile.
VMBACKUP_STALE_AFTER = envint("VMBACKUP_STALE_AFTER", 300)
# a worker cluster stopped (TERM/INT) interrupts its jobs and ends within this many seconds
VMBACKUP_WORKER_STOP_TIMEOUT = envint("VMBACKUP_WORKER_STOP_TIMEOUT", 60)
# a run queued this long while its cluster is alive is reported and enqueued again
VMBACKUP_QUEUED_ALERT_AFTER = envint("VMBACKUP_QUEUED_ALERT_AFTER", 300)
# Backups made without a policy ("Back up now", vmbackup_run): the newest N of each VM are
# kept (protected ones always); 0 keeps them all.
VMBACKUP_KEEP_MANUAL = envint("VMBACKUP_KEEP_MANUAL", 5)
# Seconds to wait for a guest to shut down (offline method) before refusing.
VMBACKUP_SHUTDOWN_TIMEOUT = envint("VMBACKUP_SHUTDOWN_TIMEOUT", 300)
# Daily copies of this database kept in <VMBACKUP_ROOT>/.vmbackup-db/ (vmbackup_dump).
VMBACKUP_DUMP_KEEP = envint("VMBACKUP_DUMP_KEEP", 14)
# Offsite copies (restic): restic's local cache (private, made 0700 by the worker), and how
# often reconcile requeues a copy whose worker died before it gives up on it.
VMBACKUP_RESTIC_CACHE_DIR = env("VMBACKUP_RESTIC_CACHE_DIR", str(DATA_DIR / "restic-cache"))
VMBACKUP_OFFSITE_ATTEMPTS = envint("VMBACKUP_OFFSITE_ATTEMPTS", 3)
# The ssh client configuration sftp: repositories are reached with (keys, known hosts): a
# file the admin controls on the worker hosts, never options from the database (restic's
# sftp.command runs a program). Blank: restic runs ssh with root's own configuration.
VMBACKUP_SSH_CONFIG = env("VMBACKUP_SSH_CONFIG", "")
# The scheduled `restic check` of every enabled repository (cron; blank: none) and the share
# of its data each pass reads and verifies (restic's --read-data-subset: 5%, 1/20, 2G).
VMBACKUP_OFFSITE_CHECK_CRON = env("VMBACKUP_OFFSITE_CHECK_CRON", "30 5 * * *")
VMBACKUP_OFFSITE_CHECK_SUBSET = env("VMBACKUP_OFFSITE_CHECK_SUBSET", "5%")
# A copy hashes (SHA-256 + qemu-img check) what it sends beside the upload, unless the backup
# was verified at most this many minutes before and no file of it has changed since (the
# check right after a backup): reading it again would only halve restic's CPU. 0: always.
VMBACKUP_OFFSITE_REHASH_AFTER = envint("VMBACKUP_OFFSITE_REHASH_AFTER", 60)
# A check or offsite prune that found the repository locked is tried again this much later.
VMBACKUP_OFFSITE_RETRY_MINUTES = envint("VMBACKUP_OFFSITE_RETRY_MINUTES", 20)

# Failure mail (a policy's notify_to); any SMTP server, or set EMAIL_BACKEND.
EMAIL_BACKEND = env("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = envint("EMAIL_TIMEOUT", 20)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "vmbackup@localhost")
# The dashboard's address, for links in mail (e.g. https://backup.example.com).
VMBACKUP_URL = env("VMBACKUP_URL", "")
# Alerts: who hears about runs without a policy (and policies without notify_to), when a
# VM's last good backup is stale (a policy may set its own window), and how long no worker
# cluster of a host may be heard from before that is an alert.
VMBACKUP_NOTIFY_TO = envlist("VMBACKUP_NOTIFY_TO", [])
VMBACKUP_STALE_HOURS = envint("VMBACKUP_STALE_HOURS", 36)
VMBACKUP_WORKER_DOWN_MINUTES = envint("VMBACKUP_WORKER_DOWN_MINUTES", 15)
# Bearer token Prometheus sends to /metrics (empty: only logged-in users with view access).
VMBACKUP_METRICS_TOKEN = env("VMBACKUP_METRICS_TOKEN", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "backups",  # before django_q: its qcluster command replaces django-q2's
    "django_q",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes requires
]

ROOT_URLCONF = "vmbackup_site.urls"
WSGI_APPLICATION = "vmbackup_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _private_sqlite(name: Path) -> None:
    """The database file 0600 before SQLite first opens it (an empty file is an empty
    database); SQLite gives its -wal and -shm files the database's mode. Files an earlier
    version left readable by others are narrowed."""
    if name.parent.is_dir():
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in (name, Path(f"{name}-wal"), Path(f"{name}-shm")):
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)


def _database(url: str | None) -> dict:
    """SQLite in the data dir by default; ``DATABASE_URL=postgres://...`` for scale-out."""
    if not url:
        name = Path(env("VMBACKUP_SQLITE_PATH", str(DATA_DIR / "vmbackup.sqlite3")))
        _private_sqlite(name)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name,
            # A file, not memory: tests that run a real worker process share it. One per
            # test process, so parallel test runs on one checkout do not collide.
            "TEST": {"NAME": name.with_name(f"{name.stem}-test-{os.getpid()}.sqlite3")},
            "OPTIONS": {
                # Writers take the lock at BEGIN, so a worker and the web process never
                # deadlock upgrading read locks; WAL lets readers run beside the writer.
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;"
                ),
            },
        }
    parts = urlparse(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": 60,
    }


DATABASES = {"default": _database(env("DATABASE_URL"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A shared cache (the database) so every process sees the workers' cluster stats.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "vmbackup_cache",
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (django-axes): after VMBACKUP_LOGIN_FAILURES failed logins for one
# username from one address, that pair is locked out for VMBACKUP_LOGIN_COOLOFF_MINUTES
# (even with the right password); a successful login resets the count. Unlock earlier
# with "manage.py axes_reset_username NAME" or in the admin.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = envint("VMBACKUP_LOGIN_FAILURES", 5)
AXES_COOLOFF_TIME = timedelta(minutes=envint("VMBACKUP_LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/lockout.html"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every request without it

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Logged-in sessions end after this many seconds (default 8 hours: one working day).
SESSION_COOKIE_AGE = envint("SESSION_COOKIE_AGE", 8 * 3600)
# Production behind a TLS-terminating proxy that sets X-Forwarded-Proto: one switch for
# secure cookies, HSTS and the redirect to https. Only with a proxy that overwrites the
# header: Django trusts it.
VMBACKUP_HTTPS = envbool("VMBACKUP_HTTPS", False)
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", VMBACKUP_HTTPS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
if VMBACKUP_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", False)

Q_WORKERS = envint("Q_WORKERS", 2)
Q_TIMEOUT = envint("Q_TIMEOUT", 24 * 3600)
Q_CLUSTER = {
    # The site's name: every process of one installation must share it (django-q2 signs
    # task payloads with it). A worker host's own queue comes from the environment variable
    # Q_CLUSTER_NAME, which django-q2 reads itself and turns into "cluster_name".
    "name": "vmbackup",
    "workers": Q_WORKERS,
    # Backups are long: the timeout bounds the longest backup, and retry must be larger
    # or django-q2 redelivers a task that is still running. One attempt: a failed backup is
    # recorded and retried by the next schedule, never replayed blindly.
    "timeout": Q_TIMEOUT,
    "retry": Q_TIMEOUT + 600,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "queue_limit": Q_WORKERS,
    "save_limit": 1000,
    "recycle": 50,
    "label": "Jobs",
    "sync": envbool("Q_SYNC", False),
    "ALT_CLUSTERS": {},  # django-q2 requires the key once Q_CLUSTER_NAME names a cluster
}
if env("REDIS_URL"):
    Q_CLUSTER["redis"] = env("REDIS_URL")
else:
    Q_CLUSTER["orm"] = "default"

LOG_LEVEL = env("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "backups": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django-q": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
