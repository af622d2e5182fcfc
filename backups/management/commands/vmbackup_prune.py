from django.core.management.base import BaseCommand, CommandError

from backups import prune
from backups.models import BackupPolicy, VirtualMachine
from backups.runner import worker_id


class Command(BaseCommand):
    help = (
        "Apply each policy's retention, and VMBACKUP_KEEP_MANUAL to backups without a policy; "
        "--dry-run prints keep/prune with the deciding rule. Exits 1 when a fold or deletion "
        "was refused (a backup failed verification: every file of its chain is kept)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true")
        parser.add_argument("--policy", help="only this policy (by name)")

    def handle(self, *args, dry_run=False, policy=None, **options):
        policies = BackupPolicy.objects.filter(enabled=True)
        if policy:
            policies = policies.filter(name=policy)
        work = [(vm, p) for p in policies for vm in p.vms.all()]
        if not policy:  # backups without a policy: the manual rule
            manual = VirtualMachine.objects.filter(
                backups__policy__isnull=True, backups__pruned_at__isnull=True
            ).distinct()
            work += [(vm, None) for vm in manual]
        refused = []
        for vm, p in work:
            if dry_run:
                self._report(prune.prune_vm(vm, p, dry_run=True))
                continue
            with prune.holding(vm, worker_id()) as free:
                if not free:
                    self.stdout.write(f"{vm.name}\tskipped: a backup or prune is running")
                    continue
                report = prune.prune_vm(vm, p)
                self._report(report)
                refused += [f"{vm.name}: {reason}" for reason in report.refused]
        if refused:
            raise CommandError("\n".join(refused))

    def _report(self, report) -> None:
        for line in report.recovered:
            self.stdout.write(f"{report.vm}\t{line}")
        if report.skipped:
            self.stdout.write(f"{report.vm}\tskipped: {report.skipped}")
            return
        for line in report.lines():
            self.stdout.write(line)
