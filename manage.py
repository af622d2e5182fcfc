#!/usr/bin/env python
import os
import sys


def main():
    """Every management command, the django-q2 worker (``manage.py qcluster``, whose
    worker processes inherit it) and ``runserver`` start here, so the umask is set here,
    before Django reads the settings: the data dir, the secret key, the SQLite database
    and its WAL, and every backup are created private from their first byte. A backup
    holds every secret of every VM. (``AppConfig.ready`` would come after the settings
    created the data dir, and would also change the umask of test runs and shells that
    merely import the project.)"""
    os.umask(0o077)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmbackup_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
