import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse
from django_q.models import Schedule

from backups import cron
from backups.models import BackupPolicy, Kind, VirtualMachine
from tests.helpers import make_backup

CREATE = reverse("policy_create")


def edit(policy):
    return reverse("policy_edit", args=[policy.pk])


def form_data(vm=None, **changes) -> dict:
    data = {
        "name": "weekly",
        "enabled": "on",
        "schedule": "30 3 * * sun",
        "method": "auto",
        "compression": "none",
        "exclude_disks": "",
        "verify_after": "on",
        "destination": "",
        "full_every": "7",
        "keep_last": "2",
        "keep_hourly": "0",
        "keep_daily": "0",
        "keep_weekly": "0",
        "keep_monthly": "0",
        "keep_yearly": "0",
        "notify_to": "",
        "drill_timeout": "300",
        "vms": [vm.pk] if vm else [],
    }
    data.update(changes)
    return data


def test_it_lists_policies_for_a_viewer(viewer_client, policy):
    response = viewer_client.get(reverse("policy_list"))
    assert b"nightly" in response.content
    assert edit(policy).encode() not in response.content  # no link without change permission


def test_it_creates_a_policy_with_vms(owner_client, vm):
    response = owner_client.post(CREATE, form_data(vm, exclude_disks="vdb, sdc ,vdb"))
    assert response["Location"] == reverse("policy_list")
    created = BackupPolicy.objects.get(name="weekly")
    assert list(created.vms.all()) == [vm]
    assert created.exclude_disks == "vdb, sdc"


def test_it_saves_a_policys_drill_settings_and_schedules_its_drills(owner_client, vm):
    data = form_data(vm, drill_schedule="0 5 * * sat", drill_command="/bin/true --x 'a b'",
                     drill_console_pattern="login:", drill_timeout="90")  # fmt: skip
    assert owner_client.post(CREATE, data).status_code == 302
    created = BackupPolicy.objects.get(name="weekly")
    assert (created.drill_schedule, created.drill_timeout) == ("0 5 * * sat", 90)
    assert (created.drill_command, created.drill_console_pattern) == (
        "/bin/true --x 'a b'",
        "login:",
    )
    drills = Schedule.objects.get(name=f"policy-{created.pk}-drill")
    assert (drills.func, drills.args, drills.cron) == (
        "backups.jobs.run_policy_drills",
        str(created.pk),
        "0 5 * * sat",
    )
    owner_client.post(edit(created), form_data(vm, drill_schedule=""))
    assert not Schedule.objects.filter(name=f"policy-{created.pk}-drill").exists()
    assert Schedule.objects.filter(name=f"policy-{created.pk}").exists()


def test_it_edits_a_policy(owner_client, policy, vm):
    response = owner_client.post(edit(policy), form_data(name="nightly", keep_last="3"))
    assert response.status_code == 302
    policy.refresh_from_db()
    assert policy.keep_last == 3
    assert list(policy.vms.all()) == []


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("schedule", "61 * * * *", "minute: 61 is outside 0-59"),
        ("schedule", "0 2 * *", "expected 5 fields"),
        ("schedule", "0 2 * * funday", "not a number or a name"),
        ("destination", "backups/vms", "Use an absolute path"),
        ("destination", "/srv/../etc", "must not contain"),
        ("destination", "/etc", "/etc is not a configured backup root"),
        ("schedule", "0 25 * * *", "hour: 25 is outside 0-23"),
        ("exclude_disks", "vda; rm -rf /", "not valid"),
        ("notify_to", "ops@example.com, nope", "Not an email address: nope"),
        ("drill_schedule", "0 2 * *", "expected 5 fields"),
        ("drill_command", "systemctl is-active nginx", "must be an absolute path"),
        ("drill_command", "/bin/sh -c 'unclosed", "No closing quotation"),
        ("drill_console_pattern", "login(", "Not a valid regular expression"),
        ("drill_timeout", "5", "greater than or equal to 10"),
    ],
)
def test_it_rejects_bad_input(owner_client, field, value, message):
    response = owner_client.post(CREATE, form_data(**{field: value}))
    assert response.status_code == 200
    assert message in str(response.context["form"].errors[field])
    if field == "schedule":
        assert message in response.context["cron_error"]
    assert not BackupPolicy.objects.exists()


def test_it_previews_the_next_five_runs(owner_client, policy):
    response = owner_client.get(edit(policy))
    runs = response.context["next_runs"]
    assert len(runs) == 5
    assert all((r.hour, r.minute) == (2, 0) for r in runs)
    assert runs == sorted(runs) and runs[1] - runs[0] == timedelta(days=1)


def test_it_previews_without_saving(owner_client, policy):
    response = owner_client.post(
        edit(policy), form_data(name="nightly", schedule="*/15 * * * *", preview="1")
    )
    assert response.status_code == 200
    runs = response.context["next_runs"]
    assert runs[1] - runs[0] == timedelta(minutes=15)
    policy.refresh_from_db()
    assert policy.schedule == "0 2 * * *"


def test_it_previews_retention_with_reasons(owner_client, policy, vm):
    old_full = make_backup(vm, ago=timedelta(days=4), policy=policy)
    make_backup(vm, ago=timedelta(days=3), kind=Kind.INCREMENTAL, parent=old_full, policy=policy)
    protected = make_backup(vm, ago=timedelta(days=2), protected=True, policy=policy)
    make_backup(vm, ago=timedelta(days=1), policy=policy)
    newest = make_backup(vm, ago=timedelta(hours=1), policy=policy)
    make_backup(vm, ago=timedelta(hours=2))  # manual: not this policy's to prune
    BackupPolicy.objects.filter(pk=policy.pk).update(
        keep_last=2, keep_daily=0, keep_weekly=0, keep_monthly=0
    )

    response = owner_client.get(edit(policy))

    (item,) = response.context["retention"]
    verdicts = {b.pk: (keep, reason) for b, keep, reason in item["rows"]}
    assert verdicts[newest.pk] == (True, "keep-last 1/2")
    assert verdicts[protected.pk] == (True, "protected")
    assert verdicts[old_full.pk] == (False, "pruned")
    assert (item["kept"], item["pruned"]) == (3, 2)
    assert b"keep-last 1/2" in response.content


def test_it_previews_retention_for_the_vms_selected_in_the_form(owner_client, host, vm):
    other = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1")
    make_backup(other)
    response = owner_client.post(CREATE, form_data(other, preview="1"))
    assert [item["vm"].name for item in response.context["retention"]] == ["db-1"]
    assert not BackupPolicy.objects.exists()


def test_it_needs_add_permission_to_create(operator_client):
    assert operator_client.get(CREATE).status_code == 403
    assert operator_client.post(CREATE, form_data()).status_code == 403


# --- the cron parser behind the form ---------------------------------------------------------

AFTER = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)  # a Thursday


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("0 2 * * *", ["2026-01-01 02:00", "2026-01-02 02:00"]),
        ("*/20 * * * *", ["2026-01-01 00:20", "2026-01-01 00:40"]),
        ("0 9 * * mon-fri", ["2026-01-01 09:00", "2026-01-02 09:00", "2026-01-05 09:00"]),
        ("0 0 1,15 feb *", ["2026-02-01 00:00", "2026-02-15 00:00"]),
        ("0 0 13 * 5", ["2026-01-02 00:00", "2026-01-09 00:00", "2026-01-13 00:00"]),
        ("0 0 * * 7", ["2026-01-04 00:00"]),
        ("5/30 1-3/2 * * *", ["2026-01-01 01:05", "2026-01-01 01:35", "2026-01-01 03:05"]),
    ],
)
def test_it_computes_next_runs(expr, expected):
    runs = cron.next_runs(expr, AFTER, len(expected))
    assert [f"{r:%Y-%m-%d %H:%M}" for r in runs] == expected


def test_it_refuses_a_date_that_never_comes():
    with pytest.raises(cron.CronError, match="no date ever matches"):
        cron.next_runs("0 0 30 2 *", AFTER, 5)


@pytest.mark.parametrize("expr", ["", "* * * * * *", "*/0 * * * *", "5-1 * * * *", "0 24 * * *"])
def test_it_rejects_invalid_cron(expr):
    with pytest.raises(cron.CronError):
        cron.parse(expr)


def test_it_saves_a_destination_that_is_a_configured_root(owner_client, settings):
    settings.VMBACKUP_ROOTS = ["/srv/nas"]
    response = owner_client.post(CREATE, form_data(destination="/srv/nas/"))
    assert response.status_code == 302
    assert BackupPolicy.objects.get().destination == "/srv/nas"


def test_it_names_the_configured_roots_beside_the_destination(owner_client, settings):
    settings.VMBACKUP_ROOT, settings.VMBACKUP_ROOTS = "/srv/main", ["/srv/nas"]
    response = owner_client.get(CREATE)
    assert "one of the backup roots (VMBACKUP_ROOTS): /srv/main, /srv/nas" in (
        response.content.decode()
    )


def test_the_preview_the_dry_run_and_the_prune_decide_the_same(
    owner_client, policy, vm, settings, tmp_path
):
    """What the policy page shows is what ``vmbackup_prune --dry-run`` prints and what the
    prune does: the policy's own backups only; manual ones follow VMBACKUP_KEEP_MANUAL."""
    from io import StringIO

    from django.core.management import call_command

    from backups.models import Backup

    settings.VMBACKUP_ROOT = str(tmp_path)  # the directories are gone already: rows only
    settings.VMBACKUP_KEEP_MANUAL = 1
    policy.vms.add(vm)
    BackupPolicy.objects.filter(pk=policy.pk).update(
        keep_last=2, keep_daily=0, keep_weekly=0, keep_monthly=0
    )

    def backup(days: int, run_id: int, **fields):
        created = datetime(2026, 11, 20, 2, tzinfo=UTC) + timedelta(days=days)
        path = tmp_path / vm.name / f"{created:%Y%m%dT%H%M%SZ}-{run_id}"
        return make_backup(vm, path=str(path), created_at=created, **fields)

    owned = [backup(d, 10 + d, policy=policy) for d in range(5)]
    manual = [backup(d, 20 + d) for d in range(3)]

    preview = owner_client.get(edit(policy)).context["retention"]
    shown = {b.pk: keep for b, keep, _reason in preview[0]["rows"]}
    out = StringIO()
    call_command("vmbackup_prune", "--dry-run", stdout=out)
    dry = {
        int(f[2]): f[3] == "keep"
        for f in (line.split("\t") for line in out.getvalue().splitlines())
    }
    call_command("vmbackup_prune", stdout=StringIO())
    kept = set(Backup.objects.published().values_list("pk", flat=True))

    assert shown == {b.pk: b.pk in kept for b in owned}
    assert dry == {b.pk: b.pk in kept for b in owned + manual}
    assert kept == {owned[3].pk, owned[4].pk, manual[2].pk}
