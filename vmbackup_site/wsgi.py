"""The web process under a WSGI server; private by default like ``manage.py`` (umask 077
before the settings create the data dir or the database)."""

import os

from django.core.wsgi import get_wsgi_application

os.umask(0o077)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmbackup_site.settings")
application = get_wsgi_application()
