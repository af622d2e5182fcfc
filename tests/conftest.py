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
