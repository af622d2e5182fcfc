from django.core.management.base import BaseCommand, CommandError

from backups import reconcile


class Command(BaseCommand):
    help = "Repair what dead runs left behind: overlays, block jobs, frozen guests, partial dirs."

    def add_arguments(self, parser):
        parser.add_argument(
            "--stale-after", type=int, default=None, help="seconds without heartbeat = dead"
        )

    def handle(self, *args, stale_after=None, **options):
        report = reconcile.reconcile(stale_after)
        self.stdout.write(report.summary())
        if report.errors:
            raise CommandError("reconcile could not repair everything")
