import uuid
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from backups import interrupt, jobs, requests
from backups.models import Backup, DrillResult, RunStatus, Trigger, VirtualMachine


class Command(BaseCommand):
    help = (
        "Restore drill: boot a backup in an isolated sandbox (no network, overlays in "
        "VMBACKUP_DRILL_DIR, the backup never written), wait for proof of life, keep the "
        "evidence, remove everything. VM (name or UUID: its newest usable backup) or BACKUP "
        "(id or directory). With --wait it runs here: exit 0 and 'alive after N s', or 1 and "
        "the reason. Stopped by TERM, INT or HUP, it removes the sandbox, marks the drill "
        "interrupted and exits 128 + the signal's number."
    )

    def add_arguments(self, parser):
        parser.add_argument("target", help="a VM's name or UUID, a backup's id or directory")
        parser.add_argument("--wait", action="store_true", help="run here and wait for the end")

    def handle(self, *args, **options):
        with interrupt.Guard("vmbackup_drill") as guard:
            self._handle(guard, **options)

    def _handle(self, guard, *, target, wait, **options):
        backup = _find(target)
        try:
            drill = requests.request_drill(backup, trigger=Trigger.COMMAND, enqueue=not wait)
        except requests.DrillRefused as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self.stdout.write(f"queued drill {drill.pk} of backup {backup.pk}")
            return
        guard.queued(drill)
        outcome = jobs.run_drill(drill.pk)
        drill.refresh_from_db()
        if drill.status == RunStatus.QUEUED:
            drill.mark_cancelled(f"not run: {outcome}")
            raise CommandError(f"drill {drill.pk} not run: {outcome}; try again later")
        if drill.result != DrillResult.PASSED:
            raise CommandError(f"drill {drill.pk} {drill.status}: {drill.error}")
        self.stdout.write(f"proof: {drill.proof}")
        if drill.evidence_path:
            self.stdout.write(f"evidence: {drill.evidence_path}")
        self.stdout.write(f"alive after {drill.alive_after_seconds} s")


def _find(key: str) -> Backup:
    """A backup by id or directory, else a VM by name or UUID (its newest usable backup)."""
    backups = Backup.objects.select_related("vm__host", "policy")
    found = backups.filter(pk=int(key)).first() if key.isdigit() else None
    if found is None:
        found = backups.filter(path=str(Path(key).absolute()).rstrip("/")).first()
    if found is not None:
        if found.pruned_at:
            raise CommandError(f"backup {found.pk} was pruned; its files are gone")
        return found
    vms = VirtualMachine.objects.present().filter(name=key)
    if not vms.exists() and _is_uuid(key):
        vms = VirtualMachine.objects.present().filter(uuid=key)
    vm = vms.first()
    if vm is None or vms.count() > 1:
        raise CommandError(f"no backup or single VM {key!r} (a VM's name or UUID, a backup)")
    newest = requests.newest_drillable(vm)
    if newest is None:
        raise CommandError(f"{vm.name} has no usable backup to drill")
    return newest


def _is_uuid(key: str) -> bool:
    try:
        uuid.UUID(key)
    except ValueError:
        return False
    return True
