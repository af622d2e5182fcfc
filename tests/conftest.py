"""Fixtures shared by every test module (pytest finds them here without imports); plain
helpers are in ``helpers.py``.

Actors for the web tests: an owner (superuser), a viewer (read-only), an operator (view + run
backups) and an outsider (logged in, no permission). Permissions come from groups, as in
production.
"""

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from backups import inventory, restic
from backups.models import BackupPolicy, Disk, Host, OffsiteRepository, Restore, VirtualMachine
from backups.offsite import restic_repository
from tests import domains as domains_mod
from tests import sshd
from tests.helpers import logged_in, make_user


@pytest.fixture(scope="session")
def _swept():
    """Remove what a killed earlier run left in libvirtd, once per session."""
    domains_mod.sweep()
    yield


@pytest.fixture
def domains(_swept):
    """Creates tiny real domains; every one is removed at teardown, pass or fail."""
    factory = domains_mod.Domains()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def libvirt_uri():
    return domains_mod.URI


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("alice", "alice@example.com", "pw-alice-1")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def backup_root(settings, _swept):
    """A backup root QEMU can write into (push mode), removed afterwards."""
    root = domains_mod.make_dir(
        domains_mod.BASE / f"{domains_mod.PREFIX}root-{uuid.uuid4().hex[:8]}"
    )
    settings.VMBACKUP_ROOT = str(root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def allow_root(settings):
    """Adds a directory to VMBACKUP_ROOTS, as an operator configures a second destination."""

    def allow(path):
        settings.VMBACKUP_ROOTS = [*settings.VMBACKUP_ROOTS, str(path)]
        return path

    return allow


@pytest.fixture
def host(db, libvirt_uri):
    """The host the tests' domains run on; the web tests only read its name."""
    return Host.objects.create(name="hv1", uri=libvirt_uri)


@pytest.fixture
def synced(host):
    """Sync the inventory and return the VM row of a test domain."""

    def sync(dom):
        inventory.sync_host(host)
        return VirtualMachine.objects.get(uuid=dom.uuid)

    return sync


@pytest.fixture
def restore_root(settings, domains):
    """A configured restore root; every domain a test restores into it is removed."""
    root = domains_mod.make_dir(
        domains_mod.BASE / f"{domains_mod.PREFIX}restore-{uuid.uuid4().hex[:8]}"
    )
    settings.VMBACKUP_RESTORE_ROOTS = [str(root)]
    try:
        yield root
    finally:
        for restore in Restore.objects.exclude(domain_uuid=""):
            domains_mod.remove_domain(domains.conn, restore.domain_uuid)
        for name in Restore.objects.values_list("name", flat=True):
            with_name = [d for d in domains.conn.listAllDomains() if d.name() == name]
            for dom in with_name:
                domains_mod.remove_domain(domains.conn, dom.UUIDString())
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], timeout=60)


@pytest.fixture(autouse=True)
def _test_uris(settings):
    """Tests may point a host at libvirt's test:/// driver; production settings refuse it."""
    settings.VMBACKUP_ALLOW_TEST_URI = True


# ------------------------------------------------------------------------- web actors


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_superuser("olivia", "olivia@example.com")


@pytest.fixture
def viewer(django_user_model):
    return make_user(django_user_model, "victor", "backups.view_virtualmachine")


@pytest.fixture
def operator(django_user_model):
    return make_user(
        django_user_model, "oscar", "backups.view_virtualmachine", "backups.run_backup"
    )


@pytest.fixture
def outsider(django_user_model):
    return make_user(django_user_model, "mallory")


@pytest.fixture
def owner_client(owner):
    return logged_in(owner)


@pytest.fixture
def viewer_client(viewer):
    return logged_in(viewer)


@pytest.fixture
def operator_client(operator):
    return logged_in(operator)


@pytest.fixture
def outsider_client(outsider):
    return logged_in(outsider)


# ------------------------------------------------------------------- rows without libvirt


@pytest.fixture
def vm(host):
    """A VM row (no domain behind it) with one disk."""
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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory to publish archives into, without libvirt or a database."""
    path = tmp_path / "backups"
    path.mkdir()
    return path


@pytest.fixture
def offsite(db, tmp_path, settings) -> OffsiteRepository:
    """An initialized restic repository in a temporary directory (its password in a private
    file beside it, restic's cache there too)."""
    settings.VMBACKUP_RESTIC_CACHE_DIR = str(tmp_path / "restic-cache")
    password = tmp_path / "restic-password"
    password.write_text(uuid.uuid4().hex + "\n")
    password.chmod(0o600)
    model = OffsiteRepository.objects.create(
        name="offsite", url=str(tmp_path / "restic-repo"), password_file=str(password)
    )
    restic.init(restic_repository(model))
    return model


@pytest.fixture
def sftp_server():
    """OpenSSH on 127.0.0.1 with keys made here (``tests.sshd``); stopped and removed."""
    if not Path(sshd.SSHD).exists():
        pytest.skip("openssh-server is required (scripts/setup-host.sh --test)")
    server = sshd.SftpServer()
    try:
        yield server.start()
    finally:
        server.stop()
