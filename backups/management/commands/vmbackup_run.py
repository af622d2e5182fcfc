from django.core.management.base import CommandError

from backups import interrupt, requests
from backups.management.base import JobCommand
from backups.models import Method, RunStatus, Trigger, VirtualMachine


class Command(JobCommand):
    help = (
        "Back up one VM (for cron). With --wait the backup runs in this process: exit 0 and "
        "the published directory as the last line, or non-zero and the reason; old "
        "checkpoints and retention then go to this machine's worker cluster, or without one "
        "are done here after the last line. Stopped by "
        "TERM, INT or HUP, it undoes what it made, marks the run interrupted and exits 128 + "
        "the signal's number (a KILL: reconcile does that)."
    )

    def add_arguments(self, parser):
        parser.add_argument("vm", help="VM name or UUID")
        parser.add_argument("--method", choices=Method.values, default=Method.AUTO)
        parser.add_argument("--wait", action="store_true", help="run here and wait for the end")
        parser.add_argument(
            "--no-space-check", action="store_true", help="skip the free-space pre-check"
        )

    def handle(self, *args, **options):
        with interrupt.Guard("vmbackup_run") as guard:
            self._handle(guard, **options)

    def _handle(self, guard, *, vm, method, wait, no_space_check, **options):
        target = _find_vm(vm)
        run_options = {"skip_space_check": True} if no_space_check else {}
        try:
            run = requests.request_backup(
                target,
                method=method,
                trigger=Trigger.COMMAND,
                policy=target.policies.filter(enabled=True).first(),
                options=run_options,
                enqueue=not wait,
            )
        except requests.RunActive as exc:
            raise CommandError(str(exc)) from exc
        if not wait:
            self.stdout.write(f"queued run {run.pk}")
            return
        guard.queued(run)
        from backups.backup import runner  # the engine, loaded only to run it here

        runner.run(run.pk, tidy=False)  # ends at the record
        run.refresh_from_db()
        if run.status != RunStatus.SUCCEEDED:
            raise CommandError(f"run {run.pk} {run.status}: {run.error}")
        handed_over = requests.hand_over_tidy(run)
        requests.request_copy_after_backup(run.pk)  # to the worker cluster, on commit
        self.stdout.write(f"run {run.pk} succeeded ({run.method}, {run.consistency})")
        self.stdout.write(run.backup.path)
        self.stdout.flush()
        if not handed_over:  # no worker here to do it: the user has the result already
            runner.tidy(run)


def _find_vm(name_or_uuid: str) -> VirtualMachine:
    present = VirtualMachine.objects.present().select_related("host")
    match = list(present.filter(name=name_or_uuid))
    if not match:
        try:
            match = list(present.filter(uuid=name_or_uuid))
        except Exception:  # not a UUID
            match = []
    if not match:
        raise CommandError(f"no VM named {name_or_uuid!r} (run vmbackup_sync first?)")
    if len(match) > 1:
        raise CommandError(f"{name_or_uuid!r} is ambiguous: give the UUID")
    return match[0]
