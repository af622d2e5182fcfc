"""The index is rebuilt from disk: published backups without a row are adopted."""

from pathlib import Path

import pytest

from backups import reconcile
from backups.models import Backup, BackupPolicy
from tests.domains import DiskSpec
from tests.helpers import push, write

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def test_it_adopts_published_backups_that_lost_their_rows(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="p", schedule="")
    full = push(vm, policy).backup
    write(domains, dom, 0, "write -P 0x42 2M 1M")
    inc = push(vm, policy).backup
    paths = {inc.path: "incremental", full.path: "full"}
    Backup.objects.filter(pk=inc.pk).delete()  # e.g. a crash between rename and insert
    Backup.objects.filter(pk=full.pk).delete()

    report = reconcile.reconcile()

    assert sorted(report.adopted) == sorted(paths)
    adopted = {b.path: b for b in Backup.objects.all()}
    assert {p: b.kind for p, b in adopted.items()} == paths
    child = adopted[inc.path]
    assert child.parent == adopted[full.path]
    assert child.policy == policy and child.run_id == inc.run_id
    assert child.verify_status == "unverified"
    assert Path(child.path).is_dir()
    assert reconcile.reconcile().adopted == []  # once
