"""gunicorn settings for the web unit (``vmbackup-web.service``), read from its environment.

Why gunicorn: the dashboard is a plain WSGI app with blocking database calls (SQLite by
default), which gunicorn's pre-fork sync workers serve simply and well; it is pure Python
(installs from the pinned requirements, no compiler), long maintained, restarts workers
gracefully on HUP, tells systemd when it is ready (Type=notify) and recycles workers. uWSGI
is in maintenance mode, waitress has no worker processes to recycle, and an ASGI server
(uvicorn, daphne) buys nothing for a synchronous app. Static files are served by whitenoise
inside the app, so the proxy in front (deploy/nginx-vmbackup.conf.example) needs no path to
them.
"""

import os

# Behind nginx on the same host: listen on loopback only (VMBACKUP_BIND in the env file).
bind = os.environ.get("VMBACKUP_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("VMBACKUP_WEB_WORKERS", "3"))
# Pages are quick (the web only reads rows and creates queued ones); a request longer
# than this is a bug, and the worker is restarted rather than left hanging.
timeout = 60
graceful_timeout = 20
# Recycle workers now and then, so a slow leak never grows unbounded.
max_requests = 1000
max_requests_jitter = 100
# Logs go to the journal through stdout/stderr.
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# The proxy on loopback sets X-Forwarded-*; Django trusts X-Forwarded-Proto only with
# VMBACKUP_HTTPS (settings.SECURE_PROXY_SSL_HEADER), gunicorn only from this address.
forwarded_allow_ips = "127.0.0.1,::1"
# No runtime control socket (gunicorn >= 25 makes one under $HOME or the runtime dir; the
# system user has neither, and systemctl reload/restart are the controls).
control_socket_disable = True
# Private files from the first byte, as manage.py and wsgi.py do (the SQLite database).
umask = 0o077
