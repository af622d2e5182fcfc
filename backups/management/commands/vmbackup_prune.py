from django.core.management.base import BaseCommand

from backups import prune
from backups.models import BackupPolicy


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
                if vm.runs.active().exists():
                    self.stdout.write(f"{vm.name}\tskipped: a backup is running")
                    continue
                report = prune.prune_vm(vm, p, dry_run=dry_run)
                if report.skipped:
                    self.stdout.write(f"{vm.name}\tskipped: {report.skipped}")
                    continue
                for line in report.lines():
                    self.stdout.write(line)
