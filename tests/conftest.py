import pytest

from tests import domains as domains_mod


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
    import shutil
    import uuid

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
    from backups.models import Host

    return Host.objects.create(name="local", uri=libvirt_uri)


@pytest.fixture
def synced(host):
    """Sync the inventory and return the VM row of a test domain."""
    from backups import inventory
    from backups.models import VirtualMachine

    def sync(dom):
        inventory.sync_host(host)
        return VirtualMachine.objects.get(uuid=dom.uuid)

    return sync


@pytest.fixture
def restore_root(settings, domains):
    """A configured restore root; every domain a test restores into it is removed."""
    import subprocess
    import uuid

    from backups.models import Restore

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
