from django.core.management.base import BaseCommand

from backups import prune
from backups.models import BackupPolicy
from backups.runner import worker_id


class Command(BaseCommand):
    help = "Apply each policy's retention; --dry-run prints keep/prune with the deciding rule."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true")
        parser.add_argument("--policy", help="only this policy (by name)")

    def handle(self, *args, dry_run=False, policy=None, **options):
        policies = BackupPolicy.objects.filter(enabled=True)
        if policy:
            policies = policies.filter(name=policy)
        for p in policies:
            for vm in p.vms.all():
                if dry_run:
                    self._report(prune.prune_vm(vm, p, dry_run=True))
                    continue
                with prune.holding(vm, worker_id()) as free:
                    if not free:
                        self.stdout.write(f"{vm.name}\tskipped: a backup or prune is running")
                        continue
                    self._report(prune.prune_vm(vm, p))

    def _report(self, report) -> None:
        if report.skipped:
            self.stdout.write(f"{report.vm}\tskipped: {report.skipped}")
            return
        for line in report.lines():
            self.stdout.write(line)
