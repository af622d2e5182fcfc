from pathlib import Path

from django.core.management.base import CommandError

from backups import interrupt, requests
from backups.management.base import JobCommand
from backups.models import Backup, OffsiteRepository, RunStatus
from backups.restore import rules as restore_rules


class Command(JobCommand):
    help = (
        "Restore a backup as a new domain (the dashboard's restore, for scripts). With --wait "
        "it runs in this process: exit 0 and the new domain's directory as the last line, or "
        "non-zero and the reason. Nothing is overwritten; the original VM is not touched. "
        "Stopped by TERM, INT or HUP, it undoes what it made, marks the restore interrupted "
        "and exits 128 + the signal's number (a KILL: reconcile does that). An --instant "
        "restore whose domain already runs is left running instead: reconcile hands its "
        "move to a worker. --disk TARGET --to FILE writes that disk alone (its chain "
        "flattened) to a new file in a restore root, for attaching by hand."
    )

    def add_arguments(self, parser):
        parser.add_argument("backup", help="backup id, or the path of its directory")
        parser.add_argument("--name", help=f"new domain name ({restore_rules.NAME_HELP})")
        parser.add_argument(
            "--in-place",
            action="store_true",
            help="restore over the backup's own VM, which must be shut off (the replaced "
            "files are kept as <file>.before-restore-<id>)",
        )
        parser.add_argument(
            "--instant",
            action="store_true",
            help="instant recovery: the new domain runs from the backup within seconds "
            "(paused unless --start) while its data moves into <root>/<name>/; with --wait "
            "this ends when the domain no longer reads the backup",
        )
        parser.add_argument(
            "--root", help="one of VMBACKUP_RESTORE_ROOTS (default: the first of them)"
        )
        parser.add_argument(
            "--disk",
            metavar="TARGET",
            help="restore only this disk (e.g. vda), its chain flattened, as the file --to",
        )
        parser.add_argument(
            "--to",
            metavar="FILE",
            help="with --disk: a new file in (or below) one of VMBACKUP_RESTORE_ROOTS",
        )
        parser.add_argument(
            "--start",
            action="store_true",
            help="start the new domain (a memory backup resumes from its saved RAM state)",
        )
        parser.add_argument(
            "--from-offsite",
            action="store_true",
            help="read the backup from its offsite copy even though its directory is here "
            "(a backup whose directory is gone is always read from offsite)",
        )
        parser.add_argument(
            "--repository", help="the offsite repository to read it from (name or id)"
        )
        parser.add_argument("--wait", action="store_true", help="run here and wait for the end")

    def handle(self, *args, **options):
        with interrupt.Guard("vmbackup_restore") as guard:
            self._handle(guard, **options)

    def _handle(self, guard, *, backup, name, root, start, wait, in_place, instant, **options):
        target = _find_backup(backup)
        if options.get("disk") or options.get("to"):
            return self._disk(guard, target, name, root, start, in_place, instant, wait, **options)
        repository = _repository(options["repository"]) if options["repository"] else None
        roots = restore_rules.allowed_roots()
        if in_place and instant:
            raise CommandError("--instant makes a new domain: not with --in-place")
        if in_place and (name or root):
            raise CommandError("--in-place restores over the VM itself: no --name or --root")
        if not in_place and not name:
            raise CommandError("--name is required (or --in-place)")
        if not in_place and root is None and not roots:
            raise CommandError("no restore root configured (VMBACKUP_RESTORE_ROOTS)")
        try:
            restore = requests.request_restore(
                target,
                name=name or "",
                root=root or (roots[0] if roots else ""),
                start=start,
                in_place=in_place,
                instant=instant,
                enqueue=not wait,
                repository=repository,
                from_offsite=options["from_offsite"],
            )
        except requests.RestoreRefused as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self.stdout.write(f"queued restore {restore.pk}")
            return
        guard.queued(restore)
        from backups.restore import run as restore_run  # the engine, loaded only to run it

        restore_run.run(restore.pk)
        restore.refresh_from_db()
        if restore.status != RunStatus.SUCCEEDED:
            raise CommandError(f"restore {restore.pk} {restore.status}: {restore.error}")
        for note in restore.notes:
            self.stdout.write(f"note: {note}")
        how = "in place" if in_place else ("instantly as" if instant else "as")
        if restore.repository_id:
            how = f"from {restore.repository.name} {how}"
        self.stdout.write(f"restored {how} {restore.name} ({restore.domain_uuid})")
        self.stdout.write(restore.path)

    def _disk(self, guard, target, name, root, start, in_place, instant, wait, *, disk, to, **_):
        if not (disk and to):
            raise CommandError("--disk TARGET and --to FILE go together")
        if name or root or start or in_place or instant:
            raise CommandError(
                "--disk restores a file: no --name, --root, --start, --in-place or --instant"
            )
        try:
            restore = requests.request_disk_restore(target, disk=disk, to=to, enqueue=not wait)
        except requests.RestoreRefused as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self.stdout.write(f"queued restore {restore.pk}")
            return
        guard.queued(restore)
        from backups.restore import run as restore_run  # the engine, loaded only to run it

        restore_run.run(restore.pk)
        restore.refresh_from_db()
        if restore.status != RunStatus.SUCCEEDED:
            raise CommandError(f"restore {restore.pk} {restore.status}: {restore.error}")
        for note in restore.notes:
            self.stdout.write(f"note: {note}")
        self.stdout.write(restore.path)


def _find_backup(key: str) -> Backup:
    backups = Backup.objects.select_related("vm__host")
    found = backups.filter(pk=int(key)).first() if key.isdigit() else None
    if found is None:
        found = backups.filter(path=str(Path(key).absolute()).rstrip("/")).first()
    if found is None:
        raise CommandError(f"no backup {key!r} (an id, or the path of a published backup)")
    return found  # pruned: restored from an offsite copy, or refused by request_restore


def _repository(key: str) -> OffsiteRepository:
    found = OffsiteRepository.objects.filter(name=key).first()
    if found is None and key.isdigit():
        found = OffsiteRepository.objects.filter(pk=int(key)).first()
    if found is None:
        raise CommandError(f"no offsite repository {key!r}")
    return found
