from django.core.management.base import BaseCommand, CommandError

from backups import hypervisor, inventory
from backups.models import Host


class Command(BaseCommand):
    help = "Read the domains of every host (the local libvirtd by default) into the inventory."

    def add_arguments(self, parser):
        parser.add_argument("--host", help="only this host (by name)")

    def handle(self, *args, host=None, **options):
        if not Host.objects.exists():
            inventory.local_host()
        hosts = Host.objects.filter(name=host) if host else Host.objects.all()
        if host and not hosts:
            raise CommandError(f"no host named {host!r}")
        failed = []
        for h in hosts:
            try:
                result = inventory.sync_host(h)
            except hypervisor.HypervisorError as exc:
                failed.append(h.name)
                self.stderr.write(f"{h.name}: {exc}")
                continue
            self.stdout.write(f"{h.name}: {result.summary()}")
        if failed:
            raise CommandError("sync failed for: " + ", ".join(failed))
