from django.core.management.base import CommandError

from backups import interrupt, verify
from backups.management.base import JobCommand
from backups.models import Backup


class Command(JobCommand):
    help = (
        "Re-hash and check stored backups; mark each verified or corrupt. Exits 1 when one "
        "failed; stopped by TERM, INT or HUP, 128 + the signal's number (the backup being "
        "checked keeps its last status)."
    )

    def add_arguments(self, parser):
        parser.add_argument("backups", nargs="*", help="backup ids or directories")
        parser.add_argument("--all", action="store_true")

    def handle(self, *args, **options):
        with interrupt.Guard("vmbackup_verify"):
            self._handle(**options)

    def _handle(self, *, backups, all, **options):
        published = Backup.objects.published().select_related("vm")
        if all:
            selected = list(published.order_by("created_at"))
        elif backups:
            selected = [_find(published, b) for b in backups]
        else:
            raise CommandError("name backups (id or path) or use --all")
        bad = 0
        for backup in selected:
            # oldest first with --all: each backup's ancestors were just re-read before it;
            # a backup named alone is checked with the whole chain it needs
            line = verify.verify_backup(backup, chain=not all)
            bad += not line.startswith("ok")
            self.stdout.write(line)
        if bad:
            raise CommandError(f"{bad} of {len(selected)} backups failed verification")


def _find(published, key: str) -> Backup:
    backup = (
        published.filter(pk=int(key)).first()
        if key.isdigit()
        else published.filter(path=key.rstrip("/")).first()
    )
    if backup is None:
        raise CommandError(f"no published backup {key!r}")
    return backup
