from django.core.management.base import CommandError

from backups import interrupt
from backups.management.base import JobCommand
from backups.models import BackupPolicy, VirtualMachine
from backups.retention import prune
from backups.worker import worker_id

EXIT_REFUSED = 1  # a fold or deletion refused: a chain failed verification
EXIT_SKIPPED = 3  # a VM skipped (a backup, restore or other prune of it was running)


class Command(JobCommand):
    help = (
        "Apply each policy's retention, and VMBACKUP_KEEP_MANUAL to backups without a policy; "
        "--dry-run prints keep/prune with the deciding rule. Exit codes: 1 when a fold or "
        "deletion was refused (a backup failed verification: every file of its chain is "
        "kept); 3 when a VM was skipped because a backup, restore or prune of it was running "
        "(each named on stderr; run again later); 128 + the signal's number when stopped by "
        "TERM, INT or HUP."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true")
        parser.add_argument("--policy", help="only this policy (by name)")

    def handle(self, *args, **options):
        with interrupt.Guard("vmbackup_prune"):
            self._handle(**options)

    def _handle(self, *, dry_run=False, policy=None, **options):
        policies = BackupPolicy.objects.filter(enabled=True)
        if policy:
            policies = policies.filter(name=policy)
        work = [(vm, p) for p in policies for vm in p.vms.all()]
        if not policy:  # backups without a policy: the manual rule
            manual = VirtualMachine.objects.filter(
                backups__policy__isnull=True, backups__pruned_at__isnull=True
            ).distinct()
            work += [(vm, None) for vm in manual]
        refused, skipped = [], []
        for vm, p in work:
            if dry_run:
                self._report(prune.prune_vm(vm, p, dry_run=True))
                continue
            with prune.holding(vm, worker_id()) as free:
                if not free:
                    skipped.append(f"{vm.name}: skipped, a backup or prune of it is running")
                    continue
                report = prune.prune_vm(vm, p)
                self._report(report)
                refused += [f"{vm.name}: {reason}" for reason in report.refused]
                if report.skipped:
                    skipped.append(f"{vm.name}: skipped, {report.skipped}")
        if refused:
            raise CommandError("\n".join(refused + skipped), returncode=EXIT_REFUSED)
        if skipped:
            raise CommandError("\n".join(skipped), returncode=EXIT_SKIPPED)

    def _report(self, report) -> None:
        for line in report.recovered:
            self.stdout.write(f"{report.vm}\t{line}")
        if report.skipped:
            return  # named on stderr, and the exit code says so
        for line in report.lines():
            self.stdout.write(line)
