import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.template import Context, Template
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule

from backups import dashboard
from backups.models import (
    BackupPolicy,
    Kind,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
    VirtualMachine,
)
from tests.helpers import make_backup, make_run, populate

URL = reverse("overview")


def rows(response) -> dict[str, object]:
    return {vm.name: vm for vm in response.context["vms"]}


@pytest.mark.django_db
def test_it_tells_a_newcomer_to_sync_when_no_host_is_known(viewer_client):
    response = viewer_client.get(URL)
    assert response.status_code == 200
    assert b"vmbackup_sync" in response.content


def test_it_tells_a_newcomer_to_define_a_vm_when_there_is_none(viewer_client, host):
    response = viewer_client.get(URL)
    assert b"make run DEMO=1" in response.content


def test_it_tells_a_newcomer_to_create_a_policy(owner_client, vm):
    response = owner_client.get(URL)
    assert b"No backup policy yet" in response.content
    assert reverse("policy_create").encode() in response.content


def test_it_computes_each_protection_state(viewer_client, host, policy, vm):
    def machine(name):
        created = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name=name)
        policy.vms.add(created)
        return created

    machine("never")
    failing = machine("failing")
    make_backup(failing, ago=timedelta(hours=3))
    make_run(failing, RunStatus.SUCCEEDED, ago=timedelta(hours=3))
    make_run(failing, RunStatus.FAILED, ago=timedelta(hours=1))
    make_run(failing, RunStatus.CANCELLED, ago=timedelta(minutes=5))  # not a result
    stale = machine("stale")
    make_backup(stale, ago=timedelta(hours=50))
    make_backup(vm, ago=timedelta(hours=2))
    make_run(vm, RunStatus.SUCCEEDED, ago=timedelta(hours=2))
    VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="unprotected")
    VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="gone", gone_at=timezone.now())

    response = viewer_client.get(URL)

    states = {name: row.protection for name, row in rows(response).items()}
    assert states == {
        "never": "never",
        "failing": "failing",
        "stale": "stale",
        "web-1": "ok",
        "unprotected": "unprotected",
    }
    assert list(states)[0] == "failing"  # problems first
    assert rows(response)["failing"].last_run_status == RunStatus.CANCELLED


def test_it_honours_the_stale_hours_setting(viewer_client, policy, vm, settings):
    make_backup(vm, ago=timedelta(hours=10))
    settings.VMBACKUP_STALE_HOURS = 6
    assert rows(viewer_client.get(URL))["web-1"].protection == "stale"


def test_it_ignores_a_disabled_policy(viewer_client, policy, vm):
    BackupPolicy.objects.filter(pk=policy.pk).update(enabled=False)
    assert rows(viewer_client.get(URL))["web-1"].protection == "unprotected"


def test_it_shows_chain_length_storage_and_next_run(viewer_client, policy, vm):
    full = make_backup(vm, ago=timedelta(days=3), size_bytes=100)
    inc1 = make_backup(vm, ago=timedelta(days=2), kind=Kind.INCREMENTAL, parent=full)
    make_backup(vm, ago=timedelta(days=1), kind=Kind.INCREMENTAL, parent=inc1)
    make_backup(vm, ago=timedelta(days=9), size_bytes=5000, pruned_at=timezone.now())
    soon = timezone.now() + timedelta(hours=5)
    Schedule.objects.update_or_create(  # saving the policy already made its schedule
        name=BackupPolicy.schedule_name_of(policy.pk),
        defaults={"func": "x", "schedule_type": "O", "next_run": soon},
    )

    row = rows(viewer_client.get(URL))["web-1"]

    assert row.chain_length == 2
    assert row.storage_bytes == 100 + 1000 + 1000  # the pruned one does not count
    assert row.next_run == soon


def test_it_filters_by_state_host_and_name(viewer_client, host, policy, vm):
    other = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1")
    make_backup(other)
    policy.vms.add(other)

    assert list(rows(viewer_client.get(URL, {"state": "never"}))) == ["web-1"]
    assert list(rows(viewer_client.get(URL, {"q": "DB"}))) == ["db-1"]
    assert rows(viewer_client.get(URL, {"host": "nope"})) == {}
    assert len(rows(viewer_client.get(URL, {"host": "hv1", "state": "bogus"}))) == 2


def test_it_totals_per_host_and_root(viewer_client, policy, vm, settings, tmp_path):
    settings.VMBACKUP_ROOT = str(tmp_path)
    policy.destination = "/nonexistent/vmbackup-root"
    policy.save()
    make_backup(vm, path=f"{tmp_path}/web-1/a", size_bytes=300)
    make_backup(vm, path="/nonexistent/vmbackup-root/web-1/b", size_bytes=40)

    response = viewer_client.get(URL)

    (total,) = response.context["host_totals"]
    assert (total.name, total.vms, total.storage_bytes) == ("hv1", 1, 340)
    roots = {r.root: r for r in response.context["root_totals"]}
    assert roots[str(tmp_path)].used_bytes == 300
    assert roots[str(tmp_path)].free_bytes is not None
    assert roots["/nonexistent/vmbackup-root"].used_bytes == 40
    assert roots["/nonexistent/vmbackup-root"].free_bytes is None
    assert b"free space unknown" in response.content


def test_it_survives_an_unreadable_worker_status(viewer_client, vm, monkeypatch):
    def broken():
        raise ConnectionError("broker down")

    monkeypatch.setattr("django_q.status.Stat.get_all", broken)
    response = viewer_client.get(URL)
    assert response.context["workers"] is None
    assert b"workers: unknown" in response.content


def test_it_pages_the_table_problems_first_with_totals_over_all_vms(
    viewer_client, host, policy, vm, monkeypatch
):
    monkeypatch.setattr(dashboard, "PER_PAGE", 2)
    for name in ("a-ok", "b-ok", "c-failing"):
        machine = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name=name)
        policy.vms.add(machine)
        make_backup(machine, ago=timedelta(hours=2))
    make_run(machine, RunStatus.FAILED)
    VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="z-unprotected")

    pages = [list(rows(viewer_client.get(URL, {"page": n}))) for n in (1, 2, 3)]

    assert pages == [["c-failing", "web-1"], ["z-unprotected", "a-ok"], ["b-ok"]]
    response = viewer_client.get(URL, {"page": 2})
    assert response.context["vm_count"] == 5
    assert response.context["state_counts"] == {
        "failing": 1,
        "stale": 0,
        "never": 1,
        "offsite-stale": 0,
        "unprotected": 1,
        "ok": 2,
    }
    assert [(t.name, t.vms, t.storage_bytes) for t in response.context["host_totals"]] == [
        ("hv1", 5, 3000)
    ]
    assert b"page 2 of 3" in response.content
    assert list(rows(viewer_client.get(URL, {"page": "99"}))) == ["b-ok"]  # the last page
    assert list(rows(viewer_client.get(URL, {"page": "x"}))) == ["c-failing", "web-1"]


def test_it_keeps_the_filters_in_the_page_links(viewer_client, host, monkeypatch):
    monkeypatch.setattr(dashboard, "PER_PAGE", 2)
    populate(host, 6)  # runs: succeeded, failed, interrupted, succeeded, ...
    filters = {"state": "failing", "q": "VM-0"}

    first = viewer_client.get(URL, filters)
    second = viewer_client.get(URL, {**filters, "page": 2})

    assert list(rows(first)) == ["vm-00001", "vm-00002"]
    assert list(rows(second)) == ["vm-00004", "vm-00005"]
    assert b'href="?state=failing&amp;q=VM-0&amp;page=2"' in first.content
    assert b'href="?state=failing&amp;q=VM-0&amp;page=1"' in second.content
    assert b"VMs 3\xe2\x80\x934 of 4" in second.content


def test_it_shows_no_pager_for_a_single_page(viewer_client, policy, vm):
    response = viewer_client.get(URL)
    assert b'class="pager"' not in response.content


@pytest.mark.parametrize("count", [10, 1000])
def test_it_costs_the_same_queries_for_10_and_1000_vms(
    viewer_client, host, count, django_assert_num_queries, monkeypatch
):
    monkeypatch.setattr(dashboard, "workers_online", lambda: 1)
    populate(host, count)
    # session, user, 2 x permissions, protection facts of all VMs, VMs of the page, their
    # enabled policies, schedules, hosts, policy exists, root list, root usage
    with django_assert_num_queries(12):
        response = viewer_client.get(URL, {"page": 2})
    page = response.context["page"]
    assert page.paginator.count == count
    assert len(response.context["vms"]) == min(count, dashboard.PER_PAGE)
    assert response.context["vm_count"] == count
    assert response.context["vms"][0].protection == "failing"
    assert response.context["vms"][0].chain_length == 1


def test_it_prints_times_like_the_date_filter_in_the_current_time_zone():
    template = Template('{% load vmbackup %}{{ t|stamp }}|{{ t|date:"Y-m-d H:i" }}|{{ n|stamp }}')
    context = Context({"t": datetime(2026, 1, 31, 23, 30, tzinfo=UTC), "n": None})
    with timezone.override("Europe/Berlin"):
        assert template.render(context) == "2026-02-01 00:30|2026-02-01 00:30|"


def test_a_vm_whose_policy_copies_offsite_is_protected_only_with_a_fresh_copy(
    viewer_client, policy, vm
):
    repo = OffsiteRepository.objects.create(name="vault", url="/srv/vault", password_file="/p")
    policy.offsite = repo
    policy.save()
    backup = make_backup(vm, ago=timedelta(hours=2))
    response = viewer_client.get(URL)
    assert response.context["state_counts"]["offsite-stale"] == 1  # fresh here, none offsite
    assert b"offsite: none yet" in response.content

    copy = OffsiteCopy.objects.create(backup=backup, repository=repo, status=RunStatus.SUCCEEDED)
    response = viewer_client.get(URL)
    assert response.context["state_counts"]["ok"] == 1
    assert b"offsite 2 h ago" in response.content

    copy.forgotten_at = timezone.now()  # forgotten by offsite retention: not offsite now
    copy.save()
    assert viewer_client.get(URL).context["state_counts"]["offsite-stale"] == 1
