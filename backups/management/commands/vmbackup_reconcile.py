from django.core.management.base import BaseCommand, CommandError

from backups import reconcile, waiting


class Command(BaseCommand):
    help = (
        "Repair what dead runs left behind: overlays, block jobs, frozen guests, partial dirs; "
        "enqueue again the runs no worker took (VMBACKUP_QUEUED_ALERT_AFTER)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--stale-after", type=int, default=None, help="seconds without heartbeat = dead"
        )
        parser.add_argument(
            "--cluster",
            default=None,
            help="only the hosts whose django-q2 cluster is this ('' = hosts without one)",
        )

    def handle(self, *args, stale_after=None, cluster=None, **options):
        report = reconcile.reconcile(stale_after, cluster=cluster)
        self.stdout.write(report.summary())
        self.stdout.write(waiting.summary(waiting.check(cluster)))
        if report.errors:
            raise CommandError("reconcile could not repair everything")
