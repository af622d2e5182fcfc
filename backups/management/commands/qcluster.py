"""django-q2's ``qcluster``, with the fixes of ``backups.cluster``: a killed worker no
longer wedges the cluster, and TERM or INT (systemd's stop, Ctrl-C) stops it within
``VMBACKUP_WORKER_STOP_TIMEOUT`` seconds, a job in flight interrupted and undone. Its main
process also reports and enqueues again the runs no worker took (``backups.waiting``).

It replaces django-q2's command because ``backups`` comes before ``django_q`` in
``INSTALLED_APPS``; the same options are accepted.
"""

import os
import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from backups import cluster, waiting


class Command(BaseCommand):
    help = (
        "Start this host's django-q2 cluster; TERM or INT stops it within "
        "VMBACKUP_WORKER_STOP_TIMEOUT seconds (exit 0; 1 if something had to be killed)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "-n", "--name", dest="cluster_name", default=None, help="the queue to serve"
        )

    def handle(self, *args, cluster_name=None, **options):
        settings.SECRET_KEY  # noqa: B018  (django-q2 signs tasks with it: fail early)
        if cluster_name:
            os.environ["Q_CLUSTER_NAME"] = cluster_name
        mine = os.environ.get("Q_CLUSTER_NAME", "")  # '' = the hosts without a cluster
        code = cluster.serve(
            settings.VMBACKUP_WORKER_STOP_TIMEOUT,
            tick=lambda: waiting.check(mine),
            every=min(60, settings.VMBACKUP_QUEUED_ALERT_AFTER),
        )
        sys.stdout.flush()
        if code:
            raise SystemExit(code)
