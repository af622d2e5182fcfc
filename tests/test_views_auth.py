"""The security matrix: every page needs a login, every mutation POST + CSRF + a permission."""

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse

from backups.models import (
    BackupPolicy,
    BackupRun,
    Drill,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
)
from tests.helpers import make_backup, make_run

MISSING = 999_999


@pytest.fixture
def objects(policy, vm):
    backup = make_backup(vm)
    return {
        "vm": vm.pk,
        "run": make_run(vm, RunStatus.QUEUED).pk,
        "backup": backup.pk,
        "restore": Restore.objects.create(backup=backup, name="copy", root="/srv").pk,
        "policy": policy.pk,
        "drill": Drill.objects.create(backup=backup, screenshot=b"\x89PNG\r\n\x1a\n").pk,
        "copy": OffsiteCopy.objects.create(
            backup=backup,
            repository=OffsiteRepository.objects.create(
                name="vault", url="/srv/vault", password_file="/etc/vault.pw"
            ),
        ).pk,
    }


# (url name, kind of object in the URL or None, permission it needs)
MUTATIONS = [
    ("vm_backup", "vm", "backups.run_backup"),
    ("run_cancel", "run", "backups.run_backup"),
    ("backup_verify", "backup", "backups.verify_backup"),
    ("backup_protect", "backup", "backups.change_backup"),
    ("backup_restore", "backup", "backups.restore_backup"),
    ("backup_restore_in_place", "backup", "backups.restore_in_place"),
    ("restore_cancel", "restore", "backups.restore_backup"),
    ("vm_drill", "vm", "backups.restore_backup"),
    ("backup_drill", "backup", "backups.restore_backup"),
    ("policy_edit", "policy", "backups.change_backuppolicy"),
    ("policy_create", None, "backups.add_backuppolicy"),
    ("backup_copy", "backup", "backups.copy_offsite"),
    ("copy_cancel", "copy", "backups.copy_offsite"),
]
PAGES = [
    ("overview", None),
    ("vm_detail", "vm"),
    ("run_list", None),
    ("run_detail", "run"),
    ("run_progress", "run"),
    ("backup_detail", "backup"),
    ("backup_manifest", "backup"),
    ("backup_restore_md", "backup"),
    ("backup_restore_sh", "backup"),
    ("backup_restore", "backup"),
    ("backup_restore_in_place", "backup"),
    ("restore_list", None),
    ("restore_detail", "restore"),
    ("restore_progress", "restore"),
    ("drill_detail", "drill"),
    ("drill_progress", "drill"),
    ("drill_screenshot", "drill"),
    ("policy_list", None),
    ("policy_edit", "policy"),
    ("policy_create", None),
    ("copy_list", None),
    ("copy_detail", "copy"),
    ("copy_progress", "copy"),
]
FORMS = {
    "policy_edit",
    "policy_create",
    "backup_restore",
    "backup_restore_in_place",
}  # GET shows the form
POST_ONLY = [m for m in MUTATIONS if m[0] not in FORMS]


def url(name, kind, objects, pk=None):
    if kind is None:
        return reverse(name)
    return reverse(name, args=[pk if pk is not None else objects[kind]])


@pytest.mark.parametrize("name, kind", PAGES)
def test_it_sends_anonymous_visitors_to_the_login_page(client, objects, name, kind):
    target = url(name, kind, objects)
    response = client.get(target)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")


@pytest.mark.parametrize("name, kind, perm", MUTATIONS)
def test_it_sends_anonymous_posts_to_the_login_page(client, objects, name, kind, perm):
    response = client.post(url(name, kind, objects))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert BackupRun.objects.count() == 1


@pytest.mark.parametrize("name, kind", PAGES)
def test_it_forbids_pages_to_an_outsider(outsider_client, objects, name, kind):
    assert outsider_client.get(url(name, kind, objects)).status_code == 403


@pytest.mark.parametrize("name, kind, perm", POST_ONLY)
def test_it_allows_only_post_for_mutations(owner_client, objects, name, kind, perm):
    assert owner_client.get(url(name, kind, objects)).status_code == 405


@pytest.mark.parametrize("name, kind, perm", MUTATIONS)
def test_it_allows_no_other_method(owner_client, objects, name, kind, perm):
    assert owner_client.put(url(name, kind, objects)).status_code == 405


@pytest.mark.parametrize("name, kind, perm", MUTATIONS)
def test_it_forbids_mutations_to_a_viewer(viewer_client, objects, name, kind, perm, async_calls):
    response = viewer_client.post(url(name, kind, objects), {"method": "auto"})
    assert response.status_code == 403
    assert BackupRun.objects.count() == 1
    assert BackupPolicy.objects.count() == 1


@pytest.mark.parametrize("name, kind, perm", [m for m in MUTATIONS if m[1]])
def test_it_404s_for_an_unknown_id(owner_client, objects, name, kind, perm):
    assert owner_client.post(url(name, kind, objects, MISSING)).status_code == 404


@pytest.mark.parametrize("name, kind", [p for p in PAGES if p[1]])
def test_it_404s_pages_for_an_unknown_id(owner_client, objects, name, kind):
    assert owner_client.get(url(name, kind, objects, MISSING)).status_code == 404


@pytest.mark.parametrize("name, kind, perm", MUTATIONS)
def test_it_grants_each_mutation_by_its_group_permission(
    viewer, objects, name, kind, perm, async_calls
):
    group = Group.objects.create(name=f"can-{name}")
    group.permissions.add(Permission.objects.get(codename=perm.split(".")[1]))
    viewer.groups.add(group)
    client = Client()
    client.force_login(viewer)
    response = client.post(url(name, kind, objects), {"method": "auto"})
    # an action is done and redirects; a form lacks its other fields and shows them again
    assert response.status_code == (200 if name in FORMS else 302)


@pytest.mark.parametrize("name, kind, perm", MUTATIONS)
def test_it_rejects_a_post_without_the_csrf_token(owner, objects, name, kind, perm, async_calls):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(url(name, kind, objects), {"method": "auto"})
    assert response.status_code == 403
    assert BackupRun.objects.count() == 1


def test_it_accepts_a_post_with_the_csrf_token(owner, objects, async_calls):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    page = client.get(reverse("vm_detail", args=[objects["vm"]]))
    token = page.context["csrf_token"]
    response = client.post(
        reverse("run_cancel", args=[objects["run"]]), {"csrfmiddlewaretoken": str(token)}
    )
    assert response.status_code == 302


VIEWER_FORBIDDEN = {"backup_restore_md", "backup_restore_sh", *FORMS}


@pytest.mark.parametrize("name, kind", PAGES)
def test_it_lets_a_viewer_read_pages_but_not_restore_or_edit(viewer_client, objects, name, kind):
    expected = 403 if name in VIEWER_FORBIDDEN else 200
    assert viewer_client.get(url(name, kind, objects)).status_code == expected
