"""GET /metrics: who may read it, the exposition format, and a query count that does not grow."""

import re
import uuid
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from backups import dashboard, metrics
from backups.models import (
    BackupPolicy,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
    VerifyStatus,
    VirtualMachine,
)
from tests.helpers import make_backup, make_run, populate

URL = reverse("metrics")
TOKEN = "s3cret-metrics-token"
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)",?')


@pytest.fixture(autouse=True)
def _token(settings, monkeypatch):
    settings.VMBACKUP_METRICS_TOKEN = TOKEN
    monkeypatch.setattr(dashboard, "workers_online", lambda: 2)


@pytest.fixture
def scraper():
    return Client(headers={"Authorization": f"Bearer {TOKEN}"})


def _labels(body: str) -> dict[str, str]:
    labels, pos = {}, 0
    while pos < len(body):
        match = LABEL.match(body, pos)
        assert match, f"bad label set {body!r} at {pos}"
        labels[match[1]] = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], match[2])
        pos = match.end()
    return labels


def parse(text: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """A strict reader of the text format: HELP then TYPE before a family's samples, every
    label value escaped. Returns {family: type} and {(name, sorted labels): value}."""
    assert text.endswith("\n")
    types, samples, helped = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helped and help_text
            helped.add(name)
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in helped and name not in types and kind in ("gauge", "counter")
            types[name] = kind
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"bad sample line {line!r}"
            name, body, value = match.groups()
            assert name in types, f"{name} has no TYPE line"
            key = (name, tuple(sorted(_labels(body or "").items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = float(value)
    return types, samples


def series(samples: dict, name: str) -> dict[tuple, float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def vm_labels(vm) -> tuple:
    return (("host", vm.host.name), ("uuid", str(vm.uuid)), ("vm", vm.name))


@pytest.mark.django_db
def test_it_asks_anonymous_visitors_for_a_token_instead_of_redirecting():
    response = Client().get(URL)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header", ["Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer ", "Bearer"]
)
def test_it_refuses_a_wrong_token(header):
    response = Client(headers={"Authorization": header}).get(URL)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["Bearer ", "Bearer", "Bearer  "])
def test_it_never_matches_an_unset_token(settings, header):
    settings.VMBACKUP_METRICS_TOKEN = ""
    assert Client(headers={"Authorization": header}).get(URL).status_code == 401


def test_it_serves_parseable_metrics_to_the_token(scraper, policy, vm):
    response = scraper.get(URL)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = parse(response.content.decode())
    assert types["vmbackup_runs_total"] == "counter"
    assert types["vmbackup_vm_protected"] == "gauge"
    assert series(samples, "vmbackup_vm_protected") == {vm_labels(vm): 0}


def test_it_accepts_the_scheme_in_any_case(policy, vm):
    response = Client(headers={"Authorization": f"bearer {TOKEN}"}).get(URL)
    assert response.status_code == 200


def test_it_answers_head(scraper, vm):
    assert scraper.head(URL).status_code == 200


def test_it_serves_a_logged_in_viewer_without_a_token(viewer_client, settings, vm):
    settings.VMBACKUP_METRICS_TOKEN = ""
    response = viewer_client.get(URL)
    assert response.status_code == 200
    assert b"vmbackup_vm_protected{" in response.content


def test_it_forbids_a_logged_in_outsider(outsider_client, vm):
    assert outsider_client.get(URL).status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_it_allows_only_get_and_head(scraper, method):
    assert getattr(scraper, method)(URL).status_code == 405


def test_it_escapes_label_values(scraper, host):
    name = 'a "quoted" \\ name\nnext line'
    odd = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name=name)

    content = scraper.get(URL).content.decode()

    assert 'vm="a \\"quoted\\" \\\\ name\\nnext line"' in content
    _, samples = parse(content)
    assert series(samples, "vmbackup_backups") == {vm_labels(odd): 0}


def test_it_reports_each_metric(scraper, host, policy, vm):
    make_backup(vm, ago=timedelta(hours=3), size_bytes=100)
    newest = make_backup(vm, ago=timedelta(hours=2), size_bytes=20)
    make_backup(vm, ago=timedelta(hours=4), verify_status=VerifyStatus.CORRUPT)
    make_backup(vm, ago=timedelta(days=9), pruned_at=timezone.now())
    ok = make_run(vm, RunStatus.SUCCEEDED, ago=timedelta(hours=2))
    ok.finished_at = ok.started_at + timedelta(seconds=90)
    ok.save()
    make_run(vm, RunStatus.SUCCEEDED, ago=timedelta(hours=5))  # older: not the last
    failing = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1")
    policy.vms.add(failing)
    make_run(failing, RunStatus.FAILED, ago=timedelta(hours=1))
    make_run(failing, RunStatus.RUNNING, ago=timedelta(minutes=1))
    gone = VirtualMachine.objects.create(
        host=host, uuid=uuid.uuid4(), name="gone", gone_at=timezone.now()
    )
    make_backup(gone, verify_status=VerifyStatus.CORRUPT)

    _, samples = parse(scraper.get(URL).content.decode())

    web, db = vm_labels(vm), vm_labels(failing)
    assert series(samples, "vmbackup_vm_protected") == {web: 1, db: 0}
    assert series(samples, "vmbackup_vm_protection_state") == {
        tuple(sorted((*web, ("state", "ok")))): 1,
        tuple(sorted((*db, ("state", "failing")))): 1,
    }
    assert series(samples, "vmbackup_vm_last_success_timestamp_seconds") == {
        web: pytest.approx(newest.created_at.timestamp())
    }
    assert series(samples, "vmbackup_last_run_duration_seconds") == {web: 90}
    assert series(samples, "vmbackup_backups") == {web: 2, db: 0}
    assert series(samples, "vmbackup_backup_bytes") == {web: 120, db: 0}
    assert series(samples, "vmbackup_backups_corrupt") == {(): 2}
    assert series(samples, "vmbackup_runs_total") == {
        (("status", "succeeded"),): 2,
        (("status", "failed"),): 1,
        (("status", "interrupted"),): 0,
        (("status", "cancelled"),): 0,
        (("status", "skipped"),): 0,
    }
    assert series(samples, "vmbackup_runs_active") == {(): 1}
    assert series(samples, "vmbackup_workers_online") == {(): 2}


def test_it_leaves_out_workers_when_the_cluster_stats_are_unreadable(scraper, monkeypatch, db):
    monkeypatch.setattr(dashboard, "workers_online", lambda: None)
    types, samples = parse(scraper.get(URL).content.decode())
    assert "vmbackup_workers_online" in types
    assert series(samples, "vmbackup_workers_online") == {}


@pytest.mark.parametrize("count", [10, 200])
def test_it_costs_the_same_queries_for_10_and_200_vms(
    scraper, host, count, django_assert_num_queries
):
    populate(host, count)
    # protection rows, uuids + last success, stored backups, runs and restores by status,
    # last drills and drills by status, offsite copies by status and checked repositories,
    # alerts fired by kind and open ones
    with django_assert_num_queries(11):
        response = scraper.get(URL)
    _, samples = parse(response.content.decode())
    assert len(series(samples, "vmbackup_vm_protected")) == count
    assert sum(series(samples, "vmbackup_backups").values()) == 2 * count
    assert BackupPolicy.objects.count() == 1


def test_it_renders_families_without_labels():
    family = metrics.Family("vmbackup_x", "gauge", "a help text with \\ and\nnewline")
    family.add(1.5)
    assert metrics.render([family]) == (
        "# HELP vmbackup_x a help text with \\\\ and\\nnewline\n"
        "# TYPE vmbackup_x gauge\n"
        "vmbackup_x 1.5\n"
    )


def test_it_counts_restores_by_outcome_and_the_active_ones(scraper, host):
    from backups.models import Restore

    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    backup = make_backup(vm)
    for i, status in enumerate(["succeeded", "succeeded", "failed", "queued", "running"]):
        Restore.objects.create(backup=backup, name=f"r-{i}", root="/r", status=status)

    _, samples = parse(scraper.get(URL).content.decode())

    assert series(samples, "vmbackup_restores_total") == {
        (("status", "succeeded"),): 2,
        (("status", "failed"),): 1,
        (("status", "interrupted"),): 0,
        (("status", "cancelled"),): 0,
    }
    assert series(samples, "vmbackup_restores_active") == {(): 2}


def test_it_shows_offsite_ages_checks_and_copies_by_outcome(scraper, vm, policy):
    repo = OffsiteRepository.objects.create(name="vault", url="/srv/vault", password_file="/p")
    other = OffsiteRepository.objects.create(name="never", url="/srv/never", password_file="/p")
    repo.record_check(False, "5%", "pack 1234 damaged")
    policy.offsite = repo
    policy.save()
    old, new = make_backup(vm, ago=timedelta(hours=40)), make_backup(vm, ago=timedelta(hours=2))
    OffsiteCopy.objects.create(backup=old, repository=repo, status=RunStatus.SUCCEEDED)
    OffsiteCopy.objects.create(
        backup=new, repository=repo, status=RunStatus.SUCCEEDED, forgotten_at=timezone.now()
    )  # forgotten: not offsite any more
    OffsiteCopy.objects.create(backup=new, repository=repo, status=RunStatus.FAILED)
    OffsiteCopy.objects.create(backup=new, repository=other, status=RunStatus.RUNNING)

    types, samples = parse(scraper.get(URL).content.decode())

    (age,) = series(samples, "vmbackup_vm_offsite_age_seconds").items()
    assert age[0] == vm_labels(vm)
    assert 40 * 3600 - 60 < age[1] < 40 * 3600 + 60
    assert series(samples, "vmbackup_offsite_copies_total")[(("status", "succeeded"),)] == 2
    assert series(samples, "vmbackup_offsite_copies_total")[(("status", "failed"),)] == 1
    assert series(samples, "vmbackup_offsite_copies_active") == {(): 1}
    assert series(samples, "vmbackup_offsite_check_ok") == {(("repository", "vault"),): 0}
    (checked,) = series(samples, "vmbackup_offsite_check_timestamp_seconds").values()
    assert abs(checked - timezone.now().timestamp()) < 60
    assert types["vmbackup_offsite_copies_total"] == "counter"
    # fresh here (2 h) but its offsite copy is 40 h old (window 36 h): not protected
    host, uuid_, name = vm_labels(vm)
    state = series(samples, "vmbackup_vm_protection_state")
    assert state == {(host, ("state", "offsite-stale"), uuid_, name): 1}
    assert series(samples, "vmbackup_vm_protected") == {vm_labels(vm): 0}
