"""Chain-aware pruning on real incremental chains: what is kept stays restorable."""

from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from backups import archive, qemu_img, requests
from backups.archive import check as archive_check
from backups.models import Backup, BackupPolicy
from tests.domains import DiskSpec, make_dir
from tests.helpers import push, snapshot_copy, write

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


@pytest.fixture
def chain(domains, backup_root, synced, request):
    """Five backups (a full and four incrementals), one day apart, with a reference copy each;
    compressed when the test asks (``indirect`` parameter: the policy's compression)."""
    dom = domains.create([DiskSpec("vda", "qcow2", 32, [(0, 4, 0xA1)])], start=True)
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="p", schedule="", full_every=10, keep_last=0,
                                         keep_daily=0, keep_weekly=0, keep_monthly=0,
                                         compression=getattr(request, "param", "none"))  # fmt: skip
    policy.vms.add(vm)
    points = []
    for i in range(5):
        if i:
            write(domains, dom, 0, f"write -P {0xB0 + i} {i * 4}M 2M")
        if i == 3:
            write(domains, dom, 0, "write -z 0 1M")
        ref = snapshot_copy(dom, "vda", make_dir(dom.dir / f"ref{i}"))
        backup = push(vm, policy).backup
        Backup.objects.filter(pk=backup.pk).update(
            created_at=timezone.now() - timedelta(days=5 - i)
        )
        points.append((Backup.objects.get(pk=backup.pk), ref))
    return vm, policy, points


def assert_kept_restorable(points):
    kept = 0
    for backup, ref in points:
        backup.refresh_from_db()
        if backup.pruned_at:
            assert not Path(backup.path).exists()
            continue
        kept += 1
        assert archive_check.verify(backup.path).ok, archive_check.verify(backup.path).errors
        image = str(Path(backup.path) / "vda.qcow2")
        assert qemu_img.compare(str(ref), "qcow2", image, "qcow2")
        if backup.parent_id:
            assert backup.parent.pruned_at is None
    return kept


def prune(policy, dry_run=False) -> list[str]:
    out = StringIO()
    args = ["vmbackup_prune"] + (["--dry-run"] if dry_run else [])
    call_command(*args, stdout=out)
    return out.getvalue().splitlines()


@pytest.mark.parametrize(
    "rules,protect,expected_kept",
    [
        ({"keep_last": 2}, [], 2),  # the full and two incrementals go: the 4th becomes a full
        ({"keep_last": 1, "keep_daily": 1}, [0], 3),  # protected full keeps its place
        ({"keep_last": 1}, [2], 2),  # a protected middle point: the newest rebases onto it
    ],
)
def test_it_keeps_every_remaining_point_restorable(chain, rules, protect, expected_kept):
    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(**rules)
    for index in protect:
        Backup.objects.filter(pk=points[index][0].pk).update(protected=True)
    dry = prune(policy, dry_run=True)
    planned = {int(line.split("\t")[2]) for line in dry if "\tprune\t" in line}

    prune(policy)

    pruned = set(Backup.objects.filter(pruned_at__isnull=False).values_list("pk", flat=True))
    assert pruned == planned  # the dry run said exactly what happened
    assert assert_kept_restorable(points) == expected_kept
    newest = points[-1][0]
    newest.refresh_from_db()
    assert newest.pruned_at is None
    if newest.parent_id is None:
        assert archive.read_manifest(newest.path).kind == "full"


@pytest.mark.parametrize("chain", ["zstd"], indirect=True)
def test_it_folds_a_compressed_chain(chain):
    vm, policy, points = chain
    incrementals = [b for b, _ref in points if b.parent_id]  # the full was pulled compressed
    assert all("compress" in [e["step"] for e in b.run.journal] for b in incrementals)
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=2)

    prune(policy)

    assert assert_kept_restorable(points) == 2
    newest, _ref = points[-1]
    newest.refresh_from_db()
    assert newest.parent.parent_id is None  # the older points were folded into the chain


def test_it_prunes_only_the_policys_own_backups(domains, backup_root, synced, allow_root):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    keep_all = {"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    daily = BackupPolicy.objects.create(name="daily", schedule="", keep_last=1, **keep_all)
    nas = allow_root(make_dir(backup_root / "nas"))
    monthly = BackupPolicy.objects.create(
        name="monthly", schedule="", keep_last=5, destination=str(nas), **keep_all
    )
    daily.vms.add(vm)
    monthly.vms.add(vm)
    other = push(vm, monthly).backup
    push(vm, daily)
    push(vm, daily)  # its prune removes the first daily one only
    other.refresh_from_db()
    assert other.pruned_at is None and Path(other.path).is_dir()
    assert Backup.objects.filter(policy=daily, pruned_at__isnull=True).count() == 1


def test_it_waits_while_a_restore_reads_the_vms_chains(chain):
    from backups.models import Restore, RunStatus

    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)
    Restore.objects.create(
        backup=points[-1][0], name="r", root="/nowhere", status=RunStatus.RUNNING
    )

    with pytest.raises(CommandError) as raised:
        prune(policy)

    assert raised.value.returncode == 3
    assert str(raised.value) == f"{vm.name}: skipped, a restore of this VM is running"

    assert not Backup.objects.filter(pruned_at__isnull=False).exists()
    assert all(Path(b.path).is_dir() for b, _ref in points)


def test_a_manual_prune_and_a_backup_never_touch_one_vm_together(chain, monkeypatch):
    """vmbackup_prune holds the VM: a backup claimed meanwhile stands back, and a prune
    that finds a backup running skips the VM."""
    from backups import jobs
    from backups.models import BackupRun, PruneLock, RunStatus
    from backups.retention import prune as prune_mod

    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)
    seen = {}
    real = prune_mod.prune_vm

    def prune_while_a_backup_starts(vm_, policy_, **kwargs):
        run = requests.request_backup(vm_, method="push", enqueue=False)
        jobs.run_backup(run.pk)
        seen["run"] = BackupRun.objects.get(pk=run.pk)
        return real(vm_, policy_, **kwargs)

    monkeypatch.setattr(prune_mod, "prune_vm", prune_while_a_backup_starts)
    prune(policy)

    assert seen["run"].status == RunStatus.FAILED
    assert "being pruned" in seen["run"].error
    assert not PruneLock.objects.exists()  # released at the end
    assert Backup.objects.filter(pruned_at__isnull=False).count() == 4

    monkeypatch.setattr(prune_mod, "prune_vm", real)
    BackupRun.objects.create(vm=vm, status=RunStatus.RUNNING)
    with pytest.raises(CommandError) as raised:
        prune(policy)
    assert raised.value.returncode == 3
    assert str(raised.value) == f"{vm.name}: skipped, a backup or prune of it is running"


def test_reconcile_releases_the_lock_of_a_dead_prune(db):
    import socket
    import uuid

    from backups import reconcile
    from backups.models import Host, PruneLock, VirtualMachine

    host = Host.objects.create(name="h", uri="test:///default")
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="vm")
    PruneLock.objects.create(vm=vm, holder=f"{socket.gethostname()}:999999999")
    report = reconcile.reconcile()
    assert not PruneLock.objects.exists() and report.locks_released
    assert report.errors == []


def steps(run) -> list[str]:
    return [entry["step"] for entry in run.journal]


def run_command(vm) -> list[str]:
    out = StringIO()
    call_command("vmbackup_run", vm.name, "--method", "push", "--wait", stdout=out)
    return out.getvalue().splitlines()


def test_vmbackup_run_prints_its_backup_then_tidies_itself_without_a_cluster(chain):
    """No worker cluster here: the run ends at its record (succeeded, last line printed),
    then the command applies the retention itself, holding the VM as vmbackup_prune does."""
    from backups.models import BackupRun, PruneLock, RunStatus

    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=2)

    lines = run_command(vm)

    run = BackupRun.objects.filter(vm=vm).latest("pk")
    assert run.status == RunStatus.SUCCEEDED and lines[-1] == run.backup.path
    journal = steps(run)
    assert journal.index("published") < journal.index("tidy") < journal.index("pruned")
    tidy = next(e for e in run.journal if e["step"] == "tidy")
    assert tidy["held"] is True and run.finished_at.isoformat() <= tidy["at"]
    assert Backup.objects.filter(pruned_at__isnull=False).count() == 4
    assert not PruneLock.objects.exists()
    assert assert_kept_restorable(points) == 1


def test_vmbackup_run_hands_its_tidy_to_a_cluster_here(
    chain, monkeypatch, async_calls, django_capture_on_commit_callbacks
):
    from backups import jobs
    from backups.models import BackupRun

    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=2)
    monkeypatch.setattr("backups.worker.cluster_here", lambda: True)

    with django_capture_on_commit_callbacks(execute=True):
        lines = run_command(vm)

    run = BackupRun.objects.filter(vm=vm).latest("pk")
    assert lines[-1] == run.backup.path and "tidy" not in steps(run)
    assert async_calls == [
        (("backups.jobs.tidy_after_backup", run.pk), {"q_options": {"task_name": f"tidy-{run.pk}"}})
    ]
    assert not Backup.objects.filter(pruned_at__isnull=False).exists()

    assert jobs.tidy_after_backup(run.pk) == "tidied"
    assert Backup.objects.filter(pruned_at__isnull=False).count() == 4
    assert assert_kept_restorable(points) == 1


def test_a_tidy_stands_back_while_another_backup_of_the_vm_runs(chain):
    """That run tidies when it ends: its own checkpoint is not recorded yet."""
    from backups.backup import runner
    from backups.models import BackupRun, PruneLock, RunStatus

    vm, policy, points = chain
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=2)
    done = points[-1][0].run
    BackupRun.objects.create(vm=vm, status=RunStatus.RUNNING)

    assert runner.tidy(done).startswith("tidy skipped")
    assert "tidy-skipped" in steps(done)
    assert not Backup.objects.filter(pruned_at__isnull=False).exists()
    assert not PruneLock.objects.exists()
