from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from backups import demo, hypervisor


class Command(BaseCommand):
    help = "Create a small demo domain (TCG, no OS, two disks with known content)."

    def add_arguments(self, parser):
        parser.add_argument("--no-start", action="store_true")

    def handle(self, *args, no_start=False, **options):
        try:
            self.stdout.write(demo.create_demo(settings.VMBACKUP_LIBVIRT_URI, start=not no_start))
        except hypervisor.HypervisorError as exc:
            raise CommandError(str(exc)) from exc
