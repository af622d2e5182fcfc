"""What the commands a user or cron waits on (``vmbackup_run``, ``vmbackup_restore``,
``vmbackup_verify``, ``vmbackup_prune``) share: they pay only for what they do.

- No system checks: they would import the whole web side (URLs, views, forms, admin) to
  check it, for a command that uses none of it; the web and worker services run them when
  they start, and ``manage.py check --deploy`` is the one to run by hand.
- Run from the command line, everything loaded so far (Python, Django, the apps) lives as
  long as the process: it is frozen out of the garbage collector (``gc.freeze``), so
  neither the collections during the job nor the interpreter's exit walk it again
  (0.15-0.2 s of CPU at exit here). ``call_command`` (tests, other code) leaves the
  caller's collector alone.
- Commands import the engine they run inside ``handle`` (``--wait``), not ``jobs``, which
  loads every engine.
"""

import gc

from django.core.management.base import BaseCommand


class JobCommand(BaseCommand):
    requires_system_checks: list = []

    def run_from_argv(self, argv):
        gc.freeze()
        return super().run_from_argv(argv)
