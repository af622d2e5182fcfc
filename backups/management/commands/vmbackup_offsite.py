from django.core.management.base import BaseCommand, CommandError

from backups import interrupt, inventory, jobs, requests, restic, worker
from backups.models import Backup, CopyTrigger, Host, OffsiteRepository, RunStatus
from backups.offsite import OffsiteError, importing
from backups.offsite import forget as offsite_forget
from backups.offsite import repository as offsite_repository


class Command(BaseCommand):
    help = (
        "Offsite copies in restic repositories. `init REPO` creates the repository (refused "
        "where one exists); `copy BACKUP [--repository R] [--wait]` copies a backup (and "
        "the parents it needs there first), with --wait here: the last line is the snapshot "
        "id; `check [--repository R] [--read-data-subset P]` runs restic check (exit 1 when "
        "it finds damage); `prune [--repository R] [--dry-run]` applies the policies' "
        "offsite_keep_* (forget, then restic prune; a kept incremental's parents stay), "
        "one line per snapshot (vm, time, id, backup, keep|forget, why), exit 1 when a "
        "repository could not be pruned (an append-only one is said so, not an error); "
        "`import --repo URL --password-file F [--name N] [--host H]` "
        "lists a repository's backups into this database, new ones only (disaster recovery; "
        "exit 1 when a snapshot could not be imported, each named with the reason). Stopped "
        "by TERM, INT or HUP: 128 + the signal's number, the copy "
        "interrupted and no snapshot written."
    )

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="action", required=True)
        init = commands.add_parser("init", help="restic init, only where there is none")
        init.add_argument("repository", help="repository name or id")
        copy = commands.add_parser("copy", help="copy one backup")
        copy.add_argument("backup", help="backup id or directory")
        copy.add_argument("--repository", help="default: the backup's policy's")
        copy.add_argument("--wait", action="store_true", help="run here and wait for the end")
        check = commands.add_parser("check", help="restic check")
        check.add_argument("--repository", help="default: every enabled repository")
        check.add_argument("--read-data-subset", help="also read this share: 10%%, 1/5, 2G")
        prune = commands.add_parser("prune", help="offsite retention: forget, then prune")
        prune.add_argument("--repository", help="default: every enabled repository")
        prune.add_argument("--dry-run", action="store_true", help="show the plan only")
        found = commands.add_parser(
            "import", help="list a repository's backups into this database (disaster recovery)"
        )
        found.add_argument(
            "--repo", required=True, help="the repository URL, as restic -r takes it"
        )
        found.add_argument(
            "--password-file", required=True, help="absolute path of its password file (0600)"
        )
        found.add_argument("--name", default="", help="name of its row here (default: offsite)")
        found.add_argument(
            "--host", help="host whose VMs unknown here belong to (default: the local one)"
        )

    def handle(self, *args, action, **options):
        with interrupt.Guard("vmbackup_offsite") as guard:
            getattr(self, f"_{action}")(guard, **options)

    def _init(self, guard, *, repository, **options):
        try:
            self.stdout.write(offsite_repository.initialize(_repository(repository)))
        except OffsiteError as exc:
            raise CommandError(str(exc)) from exc

    def _copy(self, guard, *, backup, repository, wait, **options):
        chosen = _backup(backup)
        target = _repository(repository) if repository else _policy_repository(chosen)
        try:
            copy = requests.request_offsite_copy(
                chosen, target, trigger=CopyTrigger.COMMAND, enqueue=not wait
            )
        except (requests.CopyActive, requests.CopyRefused) as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self.stdout.write(f"queued copy {copy.pk}")
            return
        guard.queued(copy)
        jobs.copy_offsite(copy.pk)
        copy.refresh_from_db()
        if copy.status != RunStatus.SUCCEEDED:
            raise CommandError(f"copy {copy.pk} {copy.status}: {copy.error}")
        links = copy.links.count()
        self.stdout.write(
            f"copy {copy.pk} succeeded to {target.name}"
            + (f" after {links} parent(s)" if links else "")
            + f", {copy.bytes_added} bytes added"
        )
        self.stdout.write(copy.snapshot_id)

    def _import(self, guard, *, repo, password_file, name, host, **options):
        chosen = _host(host) if host else inventory.local_host()
        try:
            result = importing.import_repository(repo, password_file, host=chosen, name=name)
        except OffsiteError as exc:
            raise CommandError(str(exc)) from exc
        for vm in result.vms:
            self.stdout.write(f"VM {vm}: known only from the offsite copy")
        for backup in result.backups:
            self.stdout.write(
                f"backup {backup.pk}: {backup.vm.name} {backup.path.rsplit('/', 1)[-1]} "
                f"({backup.kind})"
            )
        for reason in result.skipped:
            self.stdout.write(f"skipped: {reason}")
        self.stdout.write(result.summary())
        if result.skipped:
            raise CommandError(f"{len(result.skipped)} snapshot(s) could not be imported")

    def _check(self, guard, *, repository, read_data_subset, **options):
        chosen = _chosen(repository)
        bad = 0
        for repo in chosen:
            try:
                result = offsite_repository.check(repo, read_data_subset)
            except OffsiteError as exc:  # Busy (locked) too: here it is said, not retried
                bad += 1
                self.stdout.write(f"{repo.name}: failed: {exc}")
                continue
            bad += not result.ok
            self.stdout.write(
                f"{repo.name}: ok" if result.ok else f"{repo.name}: " + "; ".join(result.errors)
            )
        if bad:
            raise CommandError(f"{bad} of {len(chosen)} repositories failed the check")

    def _prune(self, guard, *, repository, dry_run, **options):
        chosen = _chosen(repository)
        bad = 0
        for repo in chosen:
            try:
                plan, outcome = offsite_forget.run(repo, worker.worker_id(), dry_run=dry_run)
            except restic.ResticError as exc:  # the listing of a dry run
                bad += 1
                self.stdout.write(f"{repo.name}: failed: {exc}")
                continue
            for line in plan.lines() if plan else []:
                self.stdout.write(f"{repo.name}\t{line}")
            bad += not (outcome.ok or dry_run)
            self.stdout.write(f"{repo.name}: {outcome.state}: {outcome.message}")
        if bad:
            raise CommandError(f"{bad} of {len(chosen)} repositories were not pruned")


def _chosen(key: str | None) -> list[OffsiteRepository]:
    chosen = [_repository(key)] if key else list(OffsiteRepository.objects.filter(enabled=True))
    if not chosen:
        raise CommandError("no enabled offsite repository")
    return chosen


def _repository(key: str) -> OffsiteRepository:
    found = OffsiteRepository.objects.filter(name=key).first()
    if found is None and key.isdigit():
        found = OffsiteRepository.objects.filter(pk=int(key)).first()
    if found is None:
        raise CommandError(f"no offsite repository {key!r}")
    return found


def _host(key: str) -> Host:
    found = Host.objects.filter(name=key).first()
    if found is None:
        raise CommandError(f"no host {key!r}")
    return found


def _backup(key: str) -> Backup:
    published = Backup.objects.published().select_related("vm__host", "policy__offsite")
    found = (
        published.filter(pk=int(key)).first()
        if key.isdigit()
        else published.filter(path=key.rstrip("/")).first()
    )
    if found is None:
        raise CommandError(f"no published backup {key!r}")
    return found


def _policy_repository(backup: Backup) -> OffsiteRepository:
    if backup.policy is None or backup.policy.offsite is None:
        raise CommandError(f"backup {backup.pk}'s policy names no offsite repository: --repository")
    return backup.policy.offsite
