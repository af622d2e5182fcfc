"""Queries and small computations behind the dashboard pages.

Everything per VM is computed with annotations and prefetches, so a page costs the same
number of queries for ten VMs as for a thousand (pinned by the view tests). The overview
reads a few cheap facts of every VM (for its totals, filters and sort) and the rest only for
the page of VMs it shows. Nothing here talks to libvirt or qemu-img; the only local I/O is
``shutil.disk_usage`` of backup roots.
"""

import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.paginator import Paginator
from django.db.models import (
    Count,
    DateTimeField,
    Exists,
    F,
    OuterRef,
    Prefetch,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone
from django_q.models import Schedule

from . import alerts
from .models import (
    Backup,
    BackupPolicy,
    BackupRun,
    Drill,
    Kind,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
    VerifyStatus,
    VirtualMachine,
)
from .retention import rules as retention

# Protection states, worst first: the overview sorts by this order, then by name.
FAILING = "failing"
STALE = "stale"
NEVER = "never"
OFFSITE_STALE = "offsite-stale"  # fresh here, but its policy's offsite copy is not
UNPROTECTED = "unprotected"
OK = "ok"
STATES = [FAILING, STALE, NEVER, OFFSITE_STALE, UNPROTECTED, OK]
STATE_LABELS = {
    FAILING: "last run failed",
    STALE: "stale",
    NEVER: "never backed up",
    OFFSITE_STALE: "offsite copy stale",
    UNPROTECTED: "no policy",
    OK: "ok",
}
# Runs whose outcome says something about protection; cancelled/skipped runs do not.
RESULT_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED)
FAILED_STATUSES = (RunStatus.FAILED, RunStatus.INTERRUPTED)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PER_PAGE = 100  # VMs in the overview's table; rendering a row costs more than its queries


def stale_after(hours: int | None = None) -> timedelta:
    """A VM's window (its policies' smallest ``stale_after_hours``), else the site's."""
    return alerts.stale_window(hours)


def _per_vm(queryset, value):
    """A correlated subquery: ``value`` aggregated over ``queryset`` rows of the outer VM."""
    return Subquery(
        queryset.filter(vm=OuterRef("pk")).order_by().values("vm").annotate(v=value).values("v")
    )


def _latest_runs():
    """Finished runs of the outer VM, newest first (an index seek on ``run_vm_recent``)."""
    finished = BackupRun.objects.exclude(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    return finished.filter(vm=OuterRef("pk")).order_by("-created_at", "-id")


def protection_rows(queryset=None):
    """One ``values()`` row per present VM with only what the protection state, the filters,
    the sort and the totals need.

    The overview reads this for every VM, so it is kept to cheap per-VM index seeks and builds
    no model instances; the rows of the page shown get the rest from ``vms_with_facts``.
    """
    published = Backup.objects.published()
    enabled = BackupPolicy.vms.through.objects.filter(
        virtualmachine=OuterRef("pk"), backuppolicy__enabled=True
    )
    queryset = queryset if queryset is not None else VirtualMachine.objects.present()
    return (
        queryset.order_by()
        .values("pk", "name", host_name=F("host__name"))
        .annotate(
            has_policy=Exists(enabled),
            needs_offsite=Exists(enabled.filter(backuppolicy__offsite__isnull=False)),
            offsite_at=newest_offsite(),
            stale_hours=alerts.stale_hours(),
            last_success_at=Subquery(
                published.filter(vm=OuterRef("pk"))
                .order_by("-created_at", "-id")
                .values("created_at")[:1]
            ),
            storage_bytes=Coalesce(_per_vm(published, Sum("size_bytes")), 0),
            last_result_status=Subquery(
                _latest_runs().filter(status__in=RESULT_STATUSES).values("status")[:1]
            ),
        )
    )


def newest_offsite():
    """Per VM (as ``OuterRef("pk")``): the time of the newest backup that has a copy in an
    offsite repository now (succeeded, not forgotten) — the age of its offsite protection."""
    copies = OffsiteCopy.objects.succeeded().filter(vm=OuterRef("pk"), forgotten_at__isnull=True)
    return Subquery(copies.order_by("-backup__created_at").values("backup__created_at")[:1])


def vms_with_facts(queryset):
    """VMs (a page of them: the subqueries are not free) with the facts only their rows show.

    The chain's full is correlated to the outer VM, not to each backup, so that SQLite looks it
    up once per VM instead of once per backup (7x faster).
    """
    published = Backup.objects.published()
    last_full = (
        published.filter(vm=OuterRef(OuterRef("pk")), kind=Kind.FULL)
        .order_by("-created_at", "-id")
        .values("created_at")[:1]
    )
    chain = published.filter(
        kind=Kind.INCREMENTAL,
        created_at__gt=Coalesce(Subquery(last_full), Value(_EPOCH, DateTimeField())),
    )
    latest_run = _latest_runs()
    last_drill = Drill.objects.judged().filter(vm=OuterRef("pk")).order_by("-created_at", "-id")
    return (
        queryset.select_related("host")
        .prefetch_related(
            Prefetch(
                "policies",
                queryset=BackupPolicy.objects.filter(enabled=True).order_by("name"),
                to_attr="enabled_policies",
            )
        )
        .annotate(
            backup_count=Coalesce(_per_vm(published, Count("pk")), 0),
            chain_length=Coalesce(_per_vm(chain, Count("pk")), 0),
            last_run_id=Subquery(latest_run.values("pk")[:1]),
            last_run_status=Subquery(latest_run.values("status")[:1]),
            last_run_finished_at=Subquery(latest_run.values("finished_at")[:1]),
            last_drill_id=Subquery(last_drill.values("pk")[:1]),
            last_drill_result=Subquery(last_drill.values("result")[:1]),
            last_drill_at=Subquery(last_drill.values("finished_at")[:1]),
            last_drill_alive=Subquery(last_drill.values("alive_after_seconds")[:1]),
        )
    )


def protection_state(row: dict, now: datetime) -> str:
    """The state of a ``protection_rows`` row."""
    if not row["has_policy"]:
        return UNPROTECTED
    if row["last_result_status"] in FAILED_STATUSES:
        return FAILING
    if row["last_success_at"] is None:
        return NEVER
    window = stale_after(row.get("stale_hours"))
    if now - row["last_success_at"] > window:
        return STALE
    if row.get("needs_offsite") and (
        row.get("offsite_at") is None or now - row["offsite_at"] > window
    ):
        return OFFSITE_STALE  # protected only when the offsite copy is fresh too
    return OK


def schedule_next_runs(policies) -> dict[int, datetime]:
    """policy id -> ``next_run`` of its django-q2 Schedule, in one query."""
    by_name = {BackupPolicy.schedule_name_of(p.pk): p.pk for p in policies}
    if not by_name:
        return {}
    rows = Schedule.objects.filter(name__in=by_name).values_list("name", "next_run")
    return {by_name[name]: next_run for name, next_run in rows if next_run is not None}


def attach_next_runs(vms) -> None:
    """``vm.next_run``: the earliest next run among the Schedules of its enabled policies."""
    next_runs = schedule_next_runs({p for vm in vms for p in vm.enabled_policies})
    for vm in vms:
        runs = [next_runs[p.pk] for p in vm.enabled_policies if p.pk in next_runs]
        vm.next_run = min(runs) if runs else None


@dataclass
class Total:
    name: str
    vms: int = 0
    storage_bytes: int = 0
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))

    @property
    def problems(self) -> int:
        return sum(self.states[s] for s in (FAILING, STALE, NEVER, OFFSITE_STALE))


def host_totals(rows) -> list[Total]:
    totals: dict[str, Total] = {}
    for row in rows:
        total = totals.get(row["host_name"])
        if total is None:
            total = totals[row["host_name"]] = Total(row["host_name"])
        total.vms += 1
        total.storage_bytes += row["storage_bytes"]
        total.states[row["protection"]] += 1
    return sorted(totals.values(), key=lambda t: t.name)


@dataclass
class RootUsage:
    root: str
    used_bytes: int
    free_bytes: int | None
    total_bytes: int | None

    @property
    def free_percent(self) -> int | None:
        if not self.total_bytes:
            return None
        return round(100 * (self.free_bytes or 0) / self.total_bytes)


def _disk_usage(root: str):
    try:
        return shutil.disk_usage(root)
    except OSError:  # missing, unmounted or unreadable: show "unknown"
        return None


def root_totals() -> list[RootUsage]:
    """Storage per destination root (one aggregate query) and its free space (a local stat)."""
    roots = sorted(
        {settings.VMBACKUP_ROOT}
        | {p.root for p in BackupPolicy.objects.only("destination").order_by()}
    )
    aggregates = {
        f"r{index}": Sum("size_bytes", filter=Q(path__startswith=root.rstrip("/") + "/"))
        for index, root in enumerate(roots)
    }
    used = Backup.objects.published().aggregate(**aggregates)
    result = []
    for index, root in enumerate(roots):
        usage = _disk_usage(root)
        result.append(
            RootUsage(
                root=root,
                used_bytes=used[f"r{index}"] or 0,
                free_bytes=usage.free if usage else None,
                total_bytes=usage.total if usage else None,
            )
        )
    return result


def workers_online() -> int | None:
    """Clusters reporting to the shared cache; None when the cache cannot be read."""
    try:
        from django_q.status import Stat

        return len(Stat.get_all())
    except Exception:  # any broker/cache failure must not take the overview down
        return None


_RANK = {state: rank for rank, state in enumerate(STATES)}


def sort_key(row: dict) -> tuple:
    return (_RANK[row["protection"]], row["name"].lower(), row["pk"])


def page_vms(rows: list[dict], now: datetime) -> list[VirtualMachine]:
    """Model instances for the rows of one page, in their order, with every fact shown.

    What the protection state rests on is copied from the rows, so that a row never shows
    facts that disagree with the state it was sorted and counted by.
    """
    page = VirtualMachine.objects.filter(pk__in=[row["pk"] for row in rows])
    by_pk = {vm.pk: vm for vm in vms_with_facts(page)}
    vms = []
    for row in rows:
        vm = by_pk.get(row["pk"])
        if vm is None:  # deleted since the rows were read
            continue
        vm.protection = row["protection"]
        vm.protection_label = STATE_LABELS[vm.protection]
        vm.last_success_at = row["last_success_at"]
        vm.last_success_age = now - vm.last_success_at if vm.last_success_at else None
        vm.needs_offsite, vm.offsite_at = row["needs_offsite"], row["offsite_at"]
        vm.offsite_age = now - vm.offsite_at if vm.offsite_at else None
        finished = vm.last_run_finished_at
        vm.last_run_age = now - finished if finished else None
        vm.last_result_status = row["last_result_status"]
        vm.storage_bytes = row["storage_bytes"]
        vm.policy_names = ", ".join(p.name for p in vm.enabled_policies)
        vms.append(vm)
    attach_next_runs(vms)
    return vms


def overview(*, state: str = "", host: str = "", q: str = "", page=None) -> dict:
    """Everything the overview page shows: totals cover all present VMs, the table one page
    (``PER_PAGE``, problems first) of those the filters select."""
    now = timezone.now()
    rows = list(protection_rows())
    for row in rows:
        row["protection"] = protection_state(row, now)
    needle = q.lower()
    shown = [
        row
        for row in rows
        if (not state or row["protection"] == state)
        and (not host or row["host_name"] == host)
        and (not needle or needle in row["name"].lower())
    ]
    shown.sort(key=sort_key)
    page = Paginator(shown, PER_PAGE).get_page(page)
    state_counts = dict.fromkeys(STATES, 0)
    for row in rows:
        state_counts[row["protection"]] += 1
    return {
        "page": page,
        "vms": page_vms(page.object_list, now),
        "vm_count": len(rows),
        "host_totals": host_totals(rows),
        "state_counts": state_counts,
    }


# --- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    percent: int | None
    rate: float | None  # bytes per second
    eta: timedelta | None
    elapsed: timedelta | None


COPY_STARTS = ("copy", "backup-begin", "send")  # "send": an offsite copy's upload
COPY_ENDS = ("hash", "sent")


def _copy_window(run: BackupRun, now: datetime) -> timedelta | None:
    """How long bytes have been copied: the rate must not count pre-flight, hashing or
    verification, or a fast copy would read as a slow one."""
    start = end = None
    for entry in run.journal or ():
        step = entry.get("step") if isinstance(entry, dict) else None
        if start is None and step in COPY_STARTS:
            start = _parse_time(entry.get("at"))
        elif start is not None and step in COPY_ENDS:
            end = _parse_time(entry.get("at"))
            break
    start = start or run.started_at
    if start is None:
        return None
    return max((end or run.finished_at or now) - start, timedelta(0))


def _parse_time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None


def progress(run: BackupRun, now: datetime | None = None) -> Progress:
    """Rate and ETA from the bytes copied during the copy phase; None while unknown."""
    now = now or timezone.now()
    done, total = run.bytes_done, run.bytes_total
    percent = min(100, round(100 * done / total)) if total else None
    elapsed = None
    if run.started_at:
        elapsed = max((run.finished_at or now) - run.started_at, timedelta(0))
    rate = None
    copying = _copy_window(run, now)
    if copying and copying.total_seconds() > 0 and done:
        rate = done / copying.total_seconds()
    eta = None
    if rate and total and not run.is_finished:
        eta = timedelta(seconds=round(max(total - done, 0) / rate))
    return Progress(done, total, percent, rate, eta, elapsed)


# --- backups ---------------------------------------------------------------------------------


def holding(backup: Backup) -> list[OffsiteRepository]:
    """The offsite repositories holding a copy of ``backup``, by name."""
    succeeded = {
        "copies__backup": backup,
        "copies__status": RunStatus.SUCCEEDED,
        "copies__forgotten_at__isnull": True,  # the same copy row: one filter() call
    }
    return list(OffsiteRepository.objects.filter(**succeeded).distinct().order_by("name"))


def reads_offsite(backup: Backup) -> bool:
    """A restore reads the offsite copy when the directory here is gone or found bad."""
    bad = backup.verify_status in (VerifyStatus.CORRUPT, VerifyStatus.MISSING)
    return not backup.is_local or bad


def chain_rows(backups) -> list[tuple[Backup, int]]:
    """(backup, depth) rows: each chain's full first with its incrementals nested under it.

    Chains are listed newest first; an incremental whose parent is not in ``backups`` (pruned,
    or a broken chain) starts a chain of its own so it is never hidden.
    """
    by_id = {b.pk: b for b in backups}
    children = defaultdict(list)
    roots = []
    for backup in backups:
        if backup.parent_id in by_id:
            children[backup.parent_id].append(backup)
        else:
            roots.append(backup)
    rows: list[tuple[Backup, int]] = []

    def walk(backup: Backup, depth: int) -> None:
        rows.append((backup, depth))
        for child in sorted(children[backup.pk], key=lambda b: (b.created_at, b.pk)):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda b: (b.created_at, b.pk), reverse=True):
        walk(root, 0)
    return rows


# --- retention preview -----------------------------------------------------------------------


def retention_preview(policy_values: dict, vms, policy=None) -> list[dict]:
    """What a policy with these keep_* values would keep of each VM's backups — of those
    the policy owns, exactly what ``vmbackup_prune --dry-run`` and the prune decide on (a
    new policy owns none yet; backups of other policies and manual ones are not its own)."""
    values = {name: int(policy_values.get(name) or 0) for name in BackupPolicy.KEEP_FIELDS}
    rules = BackupPolicy(**values).retention_rules()
    owned = Backup.objects.published().filter(vm__in=vms)
    owned = owned.retained_by(policy) if policy is not None and policy.pk else owned.none()
    backups = owned.order_by("vm_id", "-created_at")
    by_vm = defaultdict(list)
    for backup in backups:
        by_vm[backup.vm_id].append(backup)
    tz = timezone.get_current_timezone()
    preview = []
    for vm in vms:
        lookup = {b.pk: b for b in by_vm[vm.pk]}
        points = [
            retention.Point(b.pk, b.created_at, b.parent_id, b.protected) for b in lookup.values()
        ]
        decisions = retention.decide(points, rules, tz)
        preview.append(
            {
                "vm": vm,
                "rows": [(lookup[d.point.id], d.keep, d.reason) for d in decisions],
                "kept": sum(1 for d in decisions if d.keep),
                "pruned": sum(1 for d in decisions if not d.keep),
            }
        )
    return preview
