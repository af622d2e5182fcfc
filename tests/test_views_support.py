"""Actors and data shared by the view tests (imported by every ``test_views_*`` module).

Actors: an owner (superuser), a viewer (read-only), an operator (view + run backups) and an
outsider (logged in, no permission). Permissions come from groups, as in production.
"""

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone

from backups.models import (
    Backup,
    BackupPolicy,
    BackupRun,
    Disk,
    Host,
    Kind,
    RunStatus,
    VirtualMachine,
)

__all__ = [
    "host",
    "vm",
    "policy",
    "owner",
    "viewer",
    "operator",
    "outsider",
    "owner_client",
    "viewer_client",
    "operator_client",
    "outsider_client",
    "async_calls",
]

MANIFEST = {
    "vm_name": "web-1",
    "method": "push",
    "kind": "full",
    "consistency": "filesystem-frozen",
    "disks": [
        {
            "target": "vda",
            "file": "vda.qcow2",
            "format": "qcow2",
            "bytes": 1048576,
            "sha256": "ab" * 32,
            "backing": None,
        }
    ],
    "started": "2026-01-01T02:00:00Z",
    "finished": "2026-01-01T02:05:00Z",
    "parent": None,
    "skipped": [],
}


def _user(django_user_model, name: str, *perms: str):
    # No password: the tests log in with force_login, and hashing one costs ~0.2 s per actor.
    user = django_user_model.objects.create_user(name, f"{name}@example.com")
    if perms:
        group, _ = Group.objects.get_or_create(name=f"{name}s")
        codenames = [perm.split(".", 1)[1] for perm in perms]
        group.permissions.set(Permission.objects.filter(codename__in=codenames))
        user.groups.add(group)
    return user


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_superuser("olivia", "olivia@example.com")


@pytest.fixture
def viewer(django_user_model):
    return _user(django_user_model, "victor", "backups.view_virtualmachine")


@pytest.fixture
def operator(django_user_model):
    return _user(django_user_model, "oscar", "backups.view_virtualmachine", "backups.run_backup")


@pytest.fixture
def outsider(django_user_model):
    return _user(django_user_model, "mallory")


@pytest.fixture
def owner_client(owner):
    return _client(owner)


@pytest.fixture
def viewer_client(viewer):
    return _client(viewer)


@pytest.fixture
def operator_client(operator):
    return _client(operator)


@pytest.fixture
def outsider_client(outsider):
    return _client(outsider)


@pytest.fixture
def host(db):
    return Host.objects.create(name="hv1", uri="qemu:///system")


@pytest.fixture
def vm(host):
    machine = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web-1")
    Disk.objects.create(vm=machine, target="vda", source="/var/lib/libvirt/images/web-1.qcow2")
    return machine


@pytest.fixture
def policy(vm):
    nightly = BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *")
    nightly.vms.add(vm)
    return nightly


@pytest.fixture
def async_calls(monkeypatch):
    """What ``jobs`` enqueued, instead of reaching the django-q2 broker."""
    calls = []
    monkeypatch.setattr(
        "backups.requests.async_task", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    return calls


def make_run(vm, status=RunStatus.SUCCEEDED, ago=timedelta(hours=1), **fields) -> BackupRun:
    now = timezone.now()
    defaults = {
        "created_at": now - ago,
        "started_at": now - ago,
        "finished_at": None if status in (RunStatus.QUEUED, RunStatus.RUNNING) else now - ago,
    }
    defaults.update(fields)
    return BackupRun.objects.create(vm=vm, status=status, **defaults)


def make_backup(vm, ago=timedelta(hours=1), kind=Kind.FULL, parent=None, **fields) -> Backup:
    created = timezone.now() - ago
    defaults = {
        "path": f"/var/backups/vms/{vm.name}/{created:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}",
        "created_at": created,
        "kind": kind,
        "parent": parent,
        "size_bytes": 1000,
        "manifest": dict(MANIFEST, vm_name=vm.name, kind=kind),
    }
    defaults.update(fields)
    return Backup.objects.create(vm=vm, **defaults)


def populate(host, count: int, start: int = 0) -> None:
    """``count`` VMs, each in a policy, with a finished run and a full + incremental backup."""
    now = timezone.now()
    vms = VirtualMachine.objects.bulk_create(
        VirtualMachine(host=host, uuid=uuid.uuid4(), name=f"vm-{n:05d}")
        for n in range(start, start + count)
    )
    nightly, _ = BackupPolicy.objects.get_or_create(name="bulk")
    BackupPolicy.vms.through.objects.bulk_create(
        BackupPolicy.vms.through(backuppolicy_id=nightly.pk, virtualmachine_id=v.pk) for v in vms
    )
    statuses = [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED]
    BackupRun.objects.bulk_create(
        BackupRun(
            vm=v,
            status=statuses[i % 3],
            created_at=now - timedelta(hours=1),
            started_at=now - timedelta(hours=1),
            finished_at=now,
        )
        for i, v in enumerate(vms)
    )
    fulls = Backup.objects.bulk_create(
        Backup(vm=v, path=f"/b/{v.name}/full", created_at=now - timedelta(days=2), size_bytes=10)
        for v in vms
    )
    Backup.objects.bulk_create(
        Backup(
            vm=f.vm,
            parent=f,
            kind=Kind.INCREMENTAL,
            path=f"/b/{f.vm.name}/inc",
            created_at=now - timedelta(days=1),
            size_bytes=1,
        )
        for f in fulls
    )
