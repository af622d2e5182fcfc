"""The restore pages: the form that queues a restore, and the page that follows it.

Nothing here reaches a worker: ``request_restore`` enqueues with ``transaction.on_commit``,
which never fires inside the transaction every pytest-django test runs in (checked below).
"""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from backups import access
from backups.models import Host, Restore, RestoreMode, RunStatus, VerifyStatus, VirtualMachine
from tests.helpers import logged_in, make_backup, make_user

CREATED = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
MISSING = 999_999


@pytest.fixture
def restorer(django_user_model):
    return make_user(django_user_model, "rita", access.VIEW, access.RESTORE_BACKUP)


@pytest.fixture
def restorer_client(restorer):
    return logged_in(restorer)


@pytest.fixture
def root(settings, tmp_path):
    """The one configured restore root."""
    directory = tmp_path / "restores"
    directory.mkdir()
    settings.VMBACKUP_RESTORE_ROOTS = [str(directory)]
    return str(directory)


@pytest.fixture
def backup(vm):
    return make_backup(vm, created_at=CREATED)


def form_url(backup_id: int) -> str:
    return reverse("backup_restore", args=[backup_id])


def make_restore(backup, status=RunStatus.QUEUED, **fields) -> Restore:
    if status not in (RunStatus.QUEUED, RunStatus.RUNNING):
        fields.setdefault("finished_at", timezone.now())
    fields.setdefault("name", "web-1-restored")
    return Restore.objects.create(backup=backup, root="/srv/restores", status=status, **fields)


# --- who may restore ---------------------------------------------------------------------------


def test_it_sends_anonymous_visitors_to_the_login_page(client, backup, root):
    for response in (client.get(form_url(backup.pk)), client.post(form_url(backup.pk))):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login") + "?next=")
    assert not Restore.objects.exists()


def test_it_forbids_restoring_without_the_restore_permission(viewer_client, backup, root):
    assert viewer_client.get(form_url(backup.pk)).status_code == 403
    response = viewer_client.post(form_url(backup.pk), {"name": "copy", "root": root})
    assert response.status_code == 403
    assert not Restore.objects.exists()


def test_it_answers_403_before_404_for_an_unknown_backup(viewer_client, restorer_client, root):
    assert viewer_client.get(form_url(MISSING)).status_code == 403
    assert viewer_client.post(form_url(MISSING)).status_code == 403
    assert restorer_client.get(form_url(MISSING)).status_code == 404
    assert restorer_client.post(form_url(MISSING)).status_code == 404


def test_it_rejects_a_post_without_the_csrf_token(restorer, backup, root, async_calls):
    client = Client(enforce_csrf_checks=True)
    client.force_login(restorer)
    response = client.post(form_url(backup.pk), {"name": "copy", "root": root})
    assert response.status_code == 403
    assert not Restore.objects.exists()


def test_it_shows_the_restore_button_only_to_restorers(restorer_client, viewer_client, backup):
    page = reverse("backup_detail", args=[backup.pk])
    assert form_url(backup.pk) in restorer_client.get(page).content.decode()
    assert form_url(backup.pk) not in viewer_client.get(page).content.decode()


# --- the form ----------------------------------------------------------------------------------


def test_it_shows_the_form_with_a_suggested_name(restorer_client, backup, root):
    response = restorer_client.get(form_url(backup.pk))
    content = response.content.decode()
    assert response.status_code == 200
    assert 'value="web-1-restored"' in content
    assert f'<option value="{root}" selected>{root}</option>' in content  # one root, still shown
    assert "filesystem-frozen" in content and "2026-01-01" in content
    assert "new MAC addresses" in content


def test_it_suggests_no_name_when_the_vm_name_would_not_do(restorer_client, vm, root):
    vm.name = "my vm"
    vm.save()
    backup = make_backup(vm)
    form = restorer_client.get(form_url(backup.pk)).context["form"]
    assert form["name"].value() == ""


def test_it_says_so_when_no_restore_root_is_configured(restorer_client, backup, settings):
    settings.VMBACKUP_RESTORE_ROOTS = []
    content = restorer_client.get(form_url(backup.pk)).content.decode()
    assert "No restore root is configured" in content
    assert 'type="submit" class="primary"' not in content


@pytest.mark.parametrize("name", ["a b", "../x", "-x", "x/y", "", "a" * 65])
def test_it_refuses_an_invalid_name(restorer_client, backup, root, name):
    response = restorer_client.post(form_url(backup.pk), {"name": name, "root": root})
    assert response.status_code == 200
    assert "name" in response.context["form"].errors
    assert not Restore.objects.exists()


def test_it_refuses_a_root_that_is_not_configured(restorer_client, backup, root, tmp_path):
    other = str(tmp_path / "elsewhere")
    response = restorer_client.post(form_url(backup.pk), {"name": "copy", "root": other})
    assert "root" in response.context["form"].errors
    assert not Restore.objects.exists()


def test_it_refuses_the_name_of_a_vm_on_the_same_host(restorer_client, backup, host, root):
    VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1")
    response = restorer_client.post(form_url(backup.pk), {"name": "db-1", "root": root})
    assert response.context["form"].errors["name"] == ["A domain named db-1 already exists on hv1."]
    assert not Restore.objects.exists()


def test_it_allows_a_name_used_on_another_host_or_by_a_gone_vm(
    restorer_client, backup, host, root, async_calls
):
    other = Host.objects.create(name="hv2")
    VirtualMachine.objects.create(host=other, uuid=uuid.uuid4(), name="db-1")
    VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1", gone_at=CREATED)
    response = restorer_client.post(form_url(backup.pk), {"name": "db-1", "root": root})
    assert response.status_code == 302
    assert Restore.objects.get().name == "db-1"


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"pruned_at": CREATED}, "was pruned"),
        ({"verify_status": VerifyStatus.CORRUPT}, "found it corrupt"),
        ({"verify_status": VerifyStatus.MISSING}, "found it missing"),
    ],
)
def test_it_refuses_a_backup_that_is_gone_or_broken(restorer_client, vm, root, fields, reason):
    backup = make_backup(vm, **fields)
    detail = reverse("backup_detail", args=[backup.pk])
    for response in (
        restorer_client.get(form_url(backup.pk)),
        restorer_client.post(form_url(backup.pk), {"name": "copy", "root": root}),
    ):
        assert (response.status_code, response["Location"]) == (302, detail)
    page = restorer_client.get(detail).content.decode()
    assert reason in page
    assert form_url(backup.pk) not in page  # no button either
    assert not Restore.objects.exists()


# --- queueing ----------------------------------------------------------------------------------


def test_it_queues_a_restore_and_shows_it(restorer_client, restorer, backup, root, async_calls):
    response = restorer_client.post(
        form_url(backup.pk), {"name": "web-1-copy", "root": root, "start": "on"}
    )
    restore = Restore.objects.get()
    assert response["Location"] == reverse("restore_detail", args=[restore.pk])
    assert (restore.backup, restore.name, restore.root, restore.start) == (
        backup,
        "web-1-copy",
        root,
        True,
    )
    assert (restore.status, restore.requested_by) == (RunStatus.QUEUED, restorer)
    assert async_calls == []  # on_commit did not fire: no worker was asked


def test_it_enqueues_the_restore_only_on_commit(
    restorer_client, backup, root, async_calls, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        restorer_client.post(form_url(backup.pk), {"name": "web-1-copy", "root": root})
    assert (len(callbacks), async_calls) == (1, [])
    callbacks[0]()
    restore = Restore.objects.get()
    assert async_calls[0][0] == ("backups.jobs.run_restore", restore.pk)


def test_it_refuses_a_second_restore_under_the_same_name(
    restorer_client, backup, root, async_calls
):
    data = {"name": "web-1-copy", "root": root}
    restorer_client.post(form_url(backup.pk), data)
    response = restorer_client.post(form_url(backup.pk), data)
    assert response.status_code == 200
    assert "a restore as web-1-copy is already queued or running" in response.content.decode()
    assert Restore.objects.count() == 1


# --- the restore page --------------------------------------------------------------------------


def test_it_shows_a_failed_restore_with_its_error_and_notes(viewer_client, backup):
    restore = make_restore(
        backup,
        RunStatus.FAILED,
        step="verify",
        error="backup 2026 failed its check <b>",
        notes=["the RAM state is not resumed: the new domain boots from its disks"],
    )
    response = viewer_client.get(reverse("restore_detail", args=[restore.pk]))
    content = response.content.decode()
    assert response.status_code == 200
    assert "backup 2026 failed its check &lt;b&gt;" in content
    assert "the RAM state is not resumed" in content
    assert reverse("backup_detail", args=[backup.pk]) in content
    assert "hx-get" not in content


def test_it_shows_where_a_succeeded_restore_went(viewer_client, backup):
    new_uuid = str(uuid.uuid4())
    restore = make_restore(
        backup, RunStatus.SUCCEEDED, path="/srv/restores/web-1-restored", domain_uuid=new_uuid
    )
    content = viewer_client.get(reverse("restore_detail", args=[restore.pk])).content.decode()
    assert new_uuid in content and "/srv/restores/web-1-restored" in content


def test_it_polls_the_progress_of_an_active_restore(viewer_client, backup):
    restore = make_restore(backup, RunStatus.RUNNING)
    content = viewer_client.get(reverse("restore_detail", args=[restore.pk])).content.decode()
    assert f'hx-get="{reverse("restore_progress", args=[restore.pk])}"' in content


def test_it_returns_200_from_the_partial_while_running(viewer_client, backup):
    restore = make_restore(
        backup,
        RunStatus.RUNNING,
        started_at=timezone.now(),
        step="convert",
        bytes_done=50 * 2**20,
        bytes_total=200 * 2**20,
    )
    response = viewer_client.get(reverse("restore_progress", args=[restore.pk]))
    content = response.content.decode()
    assert response.status_code == 200
    assert '<progress max="209715200" value="52428800">' in content
    assert "(25%)" in content and "step convert" in content
    assert "<html" not in content


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED])
def test_it_returns_286_from_the_partial_once_finished(viewer_client, backup, status):
    restore = make_restore(backup, status)
    response = viewer_client.get(reverse("restore_progress", args=[restore.pk]))
    assert response.status_code == 286


def test_it_forbids_restore_pages_to_an_outsider_before_looking(outsider_client, backup):
    restore = make_restore(backup)
    for name in ("restore_detail", "restore_progress"):
        assert outsider_client.get(reverse(name, args=[restore.pk])).status_code == 403
        assert outsider_client.get(reverse(name, args=[MISSING])).status_code == 403


def test_it_costs_a_fixed_number_of_queries(viewer_client, backup, django_assert_num_queries):
    restore = make_restore(backup, RunStatus.FAILED, notes=["a", "b"], journal=[{"step": "x"}])
    # session, user, 2 x permissions, the restore with its backup, VM, host and requester
    with django_assert_num_queries(5):
        viewer_client.get(reverse("restore_detail", args=[restore.pk]))


def test_the_backup_page_lists_its_restores(owner_client, vm):
    backup = make_backup(vm)
    Restore.objects.create(backup=backup, name="web-copy", root="/r", status=RunStatus.FAILED)

    page = owner_client.get(reverse("backup_detail", args=[backup.pk])).content.decode()

    assert "<h2>Restores</h2>" in page and "web-copy" in page and "failed" in page


# --- in place ----------------------------------------------------------------------------------


@pytest.fixture
def overwriter(django_user_model):
    return make_user(
        django_user_model, "olga", access.VIEW, access.RESTORE_BACKUP, access.RESTORE_IN_PLACE
    )


@pytest.fixture
def overwriter_client(overwriter):
    return logged_in(overwriter)


def test_in_place_needs_its_own_permission(restorer_client, overwriter_client, backup,
                                           async_calls):  # fmt: skip
    assert restorer_client.get(in_place_url(backup.pk)).status_code == 403
    assert restorer_client.post(in_place_url(backup.pk), {"confirm": "web-1"}).status_code == 403
    page = reverse("backup_detail", args=[backup.pk])
    assert in_place_url(backup.pk) not in restorer_client.get(page).content.decode()
    assert in_place_url(backup.pk) in overwriter_client.get(page).content.decode()
    assert not Restore.objects.exists()


def in_place_url(backup_id: int) -> str:
    return reverse("backup_restore_in_place", args=[backup_id])


def test_in_place_needs_the_restore_permission(viewer_client, backup, async_calls):
    assert viewer_client.get(in_place_url(backup.pk)).status_code == 403
    assert (
        viewer_client.post(in_place_url(backup.pk), {"confirm": backup.vm.name}).status_code == 403
    )
    assert viewer_client.get(in_place_url(MISSING)).status_code == 403
    assert not Restore.objects.exists()


def test_in_place_rejects_a_post_without_the_csrf_token(overwriter, backup, async_calls):
    client = Client(enforce_csrf_checks=True)
    client.force_login(overwriter)
    assert client.post(in_place_url(backup.pk), {"confirm": backup.vm.name}).status_code == 403
    assert not Restore.objects.exists()


@pytest.mark.parametrize("typed", ["", "WEB-1", " web-1", "web-1 ", "something else"])
def test_in_place_needs_the_vms_name_typed_exactly(overwriter_client, backup, typed, async_calls):
    assert backup.vm.name == "web-1"
    response = overwriter_client.post(in_place_url(backup.pk), {"confirm": typed})
    assert response.status_code == 200
    assert "to confirm" in response.content.decode()
    assert not Restore.objects.exists()


def test_in_place_queues_a_restore_over_the_vm(overwriter_client, overwriter, backup, async_calls):
    page = overwriter_client.get(in_place_url(backup.pk)).content.decode()
    assert "Replace the VM's disks" in page  # the button's text, from the template as is

    response = overwriter_client.post(in_place_url(backup.pk), {"confirm": "web-1", "start": "on"})

    restore = Restore.objects.get()
    assert response.status_code == 302 and response.url == restore.get_absolute_url()
    assert (restore.mode, restore.name, restore.root) == ("in-place", "web-1", "")
    assert restore.start and restore.requested_by == overwriter


def test_in_place_is_refused_for_a_vm_that_is_gone(overwriter_client, backup, async_calls):
    VirtualMachine.objects.filter(pk=backup.vm.pk).update(gone_at=timezone.now())
    response = overwriter_client.post(in_place_url(backup.pk), {"confirm": "web-1"})
    assert response.status_code == 302
    assert response.url == reverse("backup_detail", args=[backup.pk])
    assert not Restore.objects.exists()


def test_in_place_warns_when_the_vm_was_last_seen_running(overwriter_client, backup):
    VirtualMachine.objects.filter(pk=backup.vm.pk).update(state="running")
    page = overwriter_client.get(in_place_url(backup.pk)).content.decode()
    assert "Shut it down first" in page


def test_the_restore_page_says_in_place(overwriter_client, backup):
    restore = Restore.objects.create(backup=backup, mode="in-place", name="web-1")
    page = overwriter_client.get(restore.get_absolute_url()).content.decode()
    assert "in place</h1>" in page and "its disks are replaced" in page


def test_the_restore_list_shows_every_restore_in_few_queries(viewer_client, backup,
                                                            django_assert_num_queries):  # fmt: skip
    for i in range(30):
        make_restore(backup, status=RunStatus.FAILED, name=f"copy-{i}", error="disk full")
    Restore.objects.create(backup=backup, mode="in-place", name="web-1")
    with django_assert_num_queries(6):  # session, user, 2 permission, count, page: not per row
        page = viewer_client.get(reverse("restore_list")).content.decode()
    assert "copy-29" in page and "in place" in page and "disk full" in page


# --- cancel ------------------------------------------------------------------------------------


def cancel_url(restore) -> str:
    return reverse("restore_cancel", args=[restore.pk])


def test_cancel_ends_a_queued_restore_at_once(restorer_client, backup):
    restore = make_restore(backup)
    response = restorer_client.post(cancel_url(restore))
    assert response.status_code == 302 and response.url == restore.get_absolute_url()
    restore.refresh_from_db()
    assert restore.status == RunStatus.CANCELLED and restore.finished_at


def test_cancel_asks_a_running_restore_to_stop(restorer_client, backup):
    restore = make_restore(backup, status=RunStatus.RUNNING)
    restorer_client.post(cancel_url(restore))
    restore.refresh_from_db()
    assert restore.status == RunStatus.RUNNING and restore.cancel_requested
    page = restorer_client.get(reverse("restore_progress", args=[restore.pk])).content.decode()
    assert "Cancel restore</button>" in page and "disabled" in page


def test_cancel_leaves_a_finished_restore_alone(restorer_client, backup):
    restore = make_restore(backup, status=RunStatus.SUCCEEDED)
    restorer_client.post(cancel_url(restore))
    restore.refresh_from_db()
    assert restore.status == RunStatus.SUCCEEDED and not restore.cancel_requested


def test_cancel_needs_the_restore_permission_and_a_post(viewer_client, restorer_client, backup):
    restore = make_restore(backup)
    assert viewer_client.post(cancel_url(restore)).status_code == 403
    assert restorer_client.get(cancel_url(restore)).status_code == 405
    restore.refresh_from_db()
    assert restore.status == RunStatus.QUEUED


def test_an_in_place_restore_is_cancelled_with_the_in_place_permission(
    django_user_model, restorer_client, backup
):
    only_in_place = logged_in(
        make_user(django_user_model, "ines", access.VIEW, access.RESTORE_IN_PLACE)
    )
    restore = Restore.objects.create(backup=backup, mode="in-place", name="web-1")
    assert restorer_client.post(cancel_url(restore)).status_code == 403
    page = only_in_place.get(reverse("restore_progress", args=[restore.pk])).content.decode()
    assert "Cancel restore</button>" in page
    assert only_in_place.post(cancel_url(restore)).status_code == 302
    restore.refresh_from_db()
    assert restore.status == RunStatus.CANCELLED


# --- instant recovery --------------------------------------------------------------------------


def test_it_queues_an_instant_restore(restorer_client, backup, root, async_calls):
    data = {"name": "web-1-now", "root": root, "start": "on", "instant": "on"}
    response = restorer_client.post(form_url(backup.pk), data)
    restore = Restore.objects.get()
    assert response["Location"] == reverse("restore_detail", args=[restore.pk])
    assert (restore.mode, restore.name, restore.start) == (RestoreMode.INSTANT, "web-1-now", True)


def test_an_instant_restore_holds_its_name_like_a_new_domain(
    restorer_client, backup, root, async_calls
):
    restorer_client.post(form_url(backup.pk), {"name": "web-1-now", "root": root, "instant": "on"})
    response = restorer_client.post(form_url(backup.pk), {"name": "web-1-now", "root": root})
    assert "a restore as web-1-now is already queued or running" in response.content.decode()


def test_the_backup_page_names_the_domain_its_chain_is_pinned_by(owner_client, vm):
    full = make_backup(vm, ago=timedelta(days=2))
    incremental = make_backup(vm, ago=timedelta(days=1), kind="incremental", parent=full)
    later = make_backup(vm, ago=timedelta(hours=1))  # another chain: not pinned
    make_restore(incremental, RunStatus.RUNNING, name="web-now", mode=RestoreMode.INSTANT)
    make_restore(later, RunStatus.SUCCEEDED, name="web-done", mode=RestoreMode.INSTANT)

    pages = {
        b.pk: owner_client.get(reverse("backup_detail", args=[b.pk])).content.decode()
        for b in (full, incremental, later)
    }

    note = "In use by the instantly restored domain <strong>web-now</strong>"
    assert note in pages[full.pk] and note in pages[incremental.pk]
    assert "In use by" not in pages[later.pk]


def test_the_progress_says_the_instant_domain_runs_while_its_data_moves(viewer_client, backup):
    restore = make_restore(
        backup, RunStatus.RUNNING, mode=RestoreMode.INSTANT, domain_uuid=str(uuid.uuid4()),
        path="/srv/restores/web-1-restored",
    )  # fmt: skip
    page = viewer_client.get(reverse("restore_progress", args=[restore.pk])).content.decode()
    assert "runs from the backup; its data is moving into" in page
