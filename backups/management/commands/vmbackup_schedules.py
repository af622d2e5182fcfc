from django.core.management.base import BaseCommand

from backups import schedules


class Command(BaseCommand):
    help = "Install the housekeeping schedules and one schedule per policy (idempotent)."

    def handle(self, *args, **options):
        for name in schedules.install_all():
            self.stdout.write(f"scheduled {name}")
