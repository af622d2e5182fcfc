"""Prometheus text-format metrics (``GET /metrics``), so alerting sees what the overview shows.

Per-VM facts reuse the overview's protection rows and state, so an alert and the page never
disagree about a VM. Collection costs a fixed number of queries, never one per VM (pinned by
the tests). Scrapers cannot log in, so the view takes a bearer token
(``VMBACKUP_METRICS_TOKEN``) besides the dashboard session.
"""

import hmac
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db.models import Count, F, OuterRef, Q, Subquery, Sum
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_safe

from . import access, dashboard
from .models import (
    ACTIVE_STATUSES,
    Alert,
    AlertKind,
    Backup,
    BackupRun,
    Drill,
    DrillResult,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
    VerifyStatus,
    VirtualMachine,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Outcomes only: queued/running counts fall as runs start and end, so they are not counters.
FINISHED_STATUSES = [s for s in RunStatus if s not in ACTIVE_STATUSES]
# A corrupt or missing backup restores nothing: it is not counted as a restore point.
UNUSABLE = Q(verify_status__in=[VerifyStatus.CORRUPT, VerifyStatus.MISSING])


@dataclass
class Family:
    """One metric: its HELP and TYPE lines, then its samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _vm_facts() -> dict[int, dict]:
    """What the protection rows lack, per present VM: its UUID and its last success's timing."""
    last_ok = BackupRun.objects.filter(vm=OuterRef("pk"), status=RunStatus.SUCCEEDED).order_by(
        "-created_at", "-id"
    )
    rows = (
        VirtualMachine.objects.present()
        .order_by()
        .values("pk", "uuid")
        .annotate(
            ok_started=Subquery(last_ok.values("started_at")[:1]),
            ok_finished=Subquery(last_ok.values("finished_at")[:1]),
        )
    )
    return {row["pk"]: row for row in rows}


def _stored() -> dict[int, dict]:
    """Usable and corrupt published backups per VM (gone VMs too), in one grouped query."""
    rows = (
        Backup.objects.published()
        .order_by()
        .values("vm")
        .annotate(
            count=Count("pk", filter=~UNUSABLE),
            bytes=Sum("size_bytes", filter=~UNUSABLE),
            corrupt=Count("pk", filter=Q(verify_status=VerifyStatus.CORRUPT)),
        )
    )
    return {row["vm"]: row for row in rows}


def _vm_families(now: datetime, stored: dict[int, dict]) -> list[Family]:
    protected = Family("vmbackup_vm_protected", "gauge", "1 when the overview shows the VM ok")
    state = Family(
        "vmbackup_vm_protection_state",
        "gauge",
        "1 for the VM's state on the overview: failing, stale, never, unprotected or ok",
    )
    last_success = Family(
        "vmbackup_vm_last_success_timestamp_seconds",
        "gauge",
        "Creation time of the VM's newest published backup; absent when it has none",
    )
    duration = Family(
        "vmbackup_last_run_duration_seconds",
        "gauge",
        "Duration of the VM's last succeeded run; absent when it has none",
    )
    backups = Family(
        "vmbackup_backups", "gauge", "Published backups of the VM, not corrupt or missing"
    )
    size = Family(
        "vmbackup_backup_bytes", "gauge", "Stored bytes of the VM's published, usable backups"
    )
    offsite_age = Family(
        "vmbackup_vm_offsite_age_seconds",
        "gauge",
        "Age of the VM's newest backup with a copy offsite now; absent when it has none",
    )
    facts = _vm_facts()
    rows = sorted(dashboard.protection_rows(), key=lambda r: (r["host_name"], r["name"], r["pk"]))
    for row in rows:
        fact = facts.get(row["pk"])
        if fact is None:  # created between the two queries: next scrape
            continue
        labels = {"host": row["host_name"], "vm": row["name"], "uuid": str(fact["uuid"])}
        current = dashboard.protection_state(row, now)
        protected.add(int(current == dashboard.OK), **labels)
        state.add(1, **labels, state=current)
        if row["last_success_at"] is not None:
            last_success.add(row["last_success_at"].timestamp(), **labels)
        if row["offsite_at"] is not None:
            offsite_age.add(max((now - row["offsite_at"]).total_seconds(), 0.0), **labels)
        if fact["ok_started"] and fact["ok_finished"]:
            duration.add((fact["ok_finished"] - fact["ok_started"]).total_seconds(), **labels)
        kept = stored.get(row["pk"], {})
        backups.add(kept.get("count", 0), **labels)
        size.add(kept.get("bytes") or 0, **labels)
    return [protected, state, last_success, duration, backups, size, offsite_age]


def _run_families() -> list[Family]:
    rows = BackupRun.objects.order_by().values("status").annotate(n=Count("pk"))
    by_status = {row["status"]: row["n"] for row in rows}
    total = Family("vmbackup_runs_total", "counter", "Finished backup runs by outcome")
    for status in FINISHED_STATUSES:
        total.add(by_status.get(status, 0), status=status.value)
    active = Family("vmbackup_runs_active", "gauge", "Backup runs queued or running")
    active.add(sum(by_status.get(status, 0) for status in ACTIVE_STATUSES))
    return [total, active]


def _restore_families() -> list[Family]:
    rows = Restore.objects.order_by().values("status").annotate(n=Count("pk"))
    by_status = {row["status"]: row["n"] for row in rows}
    total = Family("vmbackup_restores_total", "counter", "Finished restores by outcome")
    for status in FINISHED_STATUSES:
        if status != RunStatus.SKIPPED:  # restores are never skipped
            total.add(by_status.get(status, 0), status=status.value)
    active = Family("vmbackup_restores_active", "gauge", "Restores queued or running")
    active.add(sum(by_status.get(status, 0) for status in ACTIVE_STATUSES))
    return [total, active]


def _drill_families() -> list[Family]:
    """Each present VM's last judged restore drill (two queries, whatever the number of
    VMs), and drills by outcome."""
    last = Drill.objects.judged().filter(vm=OuterRef("pk")).order_by("-created_at", "-id")
    rows = (
        VirtualMachine.objects.present()
        .order_by("host__name", "name", "pk")
        .values("uuid", "name", host_name=F("host__name"))
        .annotate(
            result=Subquery(last.values("result")[:1]),
            alive=Subquery(last.values("alive_after_seconds")[:1]),
            at=Subquery(last.values("finished_at")[:1]),
        )
        .filter(result__isnull=False)
    )
    passed = Family(
        "vmbackup_vm_last_drill_passed",
        "gauge",
        "1 when the VM's last restore drill proved its backup alive, 0 when it did not",
    )
    alive = Family(
        "vmbackup_vm_last_drill_alive_seconds",
        "gauge",
        "Time to alive (RTO) of the VM's last restore drill; absent when it failed",
    )
    when = Family(
        "vmbackup_vm_last_drill_timestamp_seconds", "gauge", "When the VM's last drill ended"
    )
    for row in rows:
        labels = {"host": row["host_name"], "vm": row["name"], "uuid": str(row["uuid"])}
        passed.add(int(row["result"] == DrillResult.PASSED), **labels)
        if row["result"] == DrillResult.PASSED and row["alive"] is not None:
            alive.add(row["alive"], **labels)
        if row["at"] is not None:
            when.add(row["at"].timestamp(), **labels)
    by_status = dict(Drill.objects.order_by().values_list("status").annotate(n=Count("pk")))
    total = Family("vmbackup_drills_total", "counter", "Finished restore drills by outcome")
    for status in FINISHED_STATUSES:
        if status != RunStatus.SKIPPED:
            total.add(by_status.get(status, 0), status=status.value)
    return [passed, alive, when, total]


def _offsite_families() -> list[Family]:
    """Copies by outcome, and each repository's last ``restic check``."""
    rows = OffsiteCopy.objects.order_by().values("status").annotate(n=Count("pk"))
    by_status = {row["status"]: row["n"] for row in rows}
    total = Family("vmbackup_offsite_copies_total", "counter", "Finished offsite copies by outcome")
    for status in FINISHED_STATUSES:
        if status != RunStatus.SKIPPED:  # copies are never skipped
            total.add(by_status.get(status, 0), status=status.value)
    active = Family("vmbackup_offsite_copies_active", "gauge", "Offsite copies queued or running")
    active.add(sum(by_status.get(status, 0) for status in ACTIVE_STATUSES))
    ok = Family(
        "vmbackup_offsite_check_ok",
        "gauge",
        "1 when the repository's last restic check passed, 0 when not; absent: never checked",
    )
    when = Family(
        "vmbackup_offsite_check_timestamp_seconds", "gauge", "Time of the repository's last check"
    )
    checked = OffsiteRepository.objects.exclude(checked_at=None).order_by("name")
    for name, at, passed in checked.values_list("name", "checked_at", "check_ok"):
        ok.add(int(bool(passed)), repository=name)
        when.add(at.timestamp(), repository=name)
    return [total, active, ok, when]


def _alert_families() -> list[Family]:
    """Every alert that fired, by kind (a counter: rows are kept), and those still open."""
    fired = Alert.objects.fired()
    by_kind = dict(fired.order_by().values_list("kind").annotate(n=Count("pk")))
    total = Family("vmbackup_alerts_total", "counter", "Alerts fired (and mailed) by kind")
    for kind in AlertKind:
        total.add(by_kind.get(kind, 0), kind=kind.value)
    active = Family(
        "vmbackup_alert_active",
        "gauge",
        "Open alerts by kind and what they are about (a VM's name; no-worker: the cluster's)",
    )
    rows = fired.open().order_by("kind", "about").values_list("kind", "about")
    for kind, about, count in rows.annotate(n=Count("pk")):
        active.add(count, kind=kind, vm=about)
    return [total, active]


def collect(now: datetime | None = None) -> list[Family]:
    """Every metric, read from the database (and django-q2's cluster stats in the cache)."""
    now = now or timezone.now()
    stored = _stored()
    corrupt = Family(
        "vmbackup_backups_corrupt", "gauge", "Published backups that verification found corrupt"
    )
    corrupt.add(sum(row["corrupt"] for row in stored.values()))
    workers = Family(
        "vmbackup_workers_online",
        "gauge",
        "django-q2 worker clusters reporting to the shared cache; absent when unreadable",
    )
    online = dashboard.workers_online()
    if online is not None:
        workers.add(online)
    return [
        *_vm_families(now, stored),
        corrupt,
        *_run_families(),
        *_restore_families(),
        *_drill_families(),
        *_offsite_families(),
        workers,
        *_alert_families(),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(families: list[Family]) -> str:
    """The text exposition format 0.0.4; label values may hold quotes, backslashes, newlines."""
    lines = []
    for family in families:
        help_text = family.help.replace("\\", r"\\").replace("\n", r"\n")
        lines += [f"# HELP {family.name} {help_text}", f"# TYPE {family.name} {family.type}"]
        for labels, value in family.samples:
            pairs = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
            selector = f"{family.name}{{{pairs}}}" if pairs else family.name
            lines.append(f"{selector} {_number(value)}")
    return "\n".join(lines) + "\n"


def token_matches(request) -> bool:
    """``Authorization: Bearer <VMBACKUP_METRICS_TOKEN>``; an unset token matches nothing."""
    expected = settings.VMBACKUP_METRICS_TOKEN or ""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if not expected or not given or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


@login_not_required
@require_safe
def metrics_view(request):
    """A scraper gets 401 rather than the middleware's login redirect, which it cannot follow;
    a person logged in to the dashboard needs the view permission, like every page."""
    if not token_matches(request):
        if not request.user.is_authenticated:
            response = HttpResponse(
                "a bearer token or a login is required\n",
                status=401,
                content_type="text/plain; charset=utf-8",
            )
            response["WWW-Authenticate"] = 'Bearer realm="vmbackup"'
            return response
        access.require(request, access.VIEW)
    return HttpResponse(render(collect()), content_type=CONTENT_TYPE)
