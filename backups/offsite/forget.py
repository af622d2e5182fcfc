"""Offsite retention: forget the snapshots a policy's ``offsite_keep_*`` counts no longer
keep, never one that a kept incremental needs, then ``restic prune``.

Which snapshots are judged: those of the repository's listing (``restic snapshots``, the
``vmbackup`` tag) that a succeeded copy of this installation records, grouped per policy
and VM, when the backup's policy names this repository. The counts mean what they mean
locally (``retention.rules.decide``: keep-last, then hourly … yearly, the newest always
kept, a protected backup always kept), applied to the backups' times. Every other snapshot
is kept: one no copy row explains (another installation's, or one made by hand), and one
whose backup has no policy naming this repository (a "Copy offsite" of a manual backup):
retention never deletes what no rule covers.

Chains: an incremental's snapshot restores only with its parents' (``parent=`` tag, then
the parent's own), and offsite nothing can be folded, so every ancestor of a kept snapshot
is kept ("parent of kept …"). The chain is read from the tags — what the snapshots hold —
not from the local rows, which a local fold rewrites.

Applying: the copies are marked forgotten first (``forgotten_at``: a copy that starts
meanwhile sends their backups again rather than build on them), then, unless a copy to the
repository is running (it may have planned on them; the next pass catches up), ``restic
forget <ids>`` and ``restic prune``. A refusal unmarks them: ``append-only`` (the backend
does not delete: forgetting is its owner's) is said so and is no failure; ``locked`` is
retried later. Copies whose snapshot is gone from the listing (forgotten by the owner of
an append-only repository) are marked forgotten too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from .. import restic, worker
from ..models import OffsiteCopy, OffsiteRepository, RunStatus
from ..retention import rules
from . import TAG, restic_repository

NO_COPY = "no copy of this installation records it"
NO_RULE = "its backup's policy keeps no offsite retention here"


@dataclass
class Verdict:
    """One snapshot and what retention does with it, in words for the dry-run."""

    snapshot: restic.Snapshot
    copy: OffsiteCopy | None
    keep: bool
    reason: str

    def line(self) -> str:
        s = self.snapshot
        vm = s.tag("vm") or "?"
        return (
            f"{vm}\t{s.time:%Y-%m-%d %H:%M}\t{s.short_id}\t{s.tag('backup') or '?'}\t"
            f"{'keep' if self.keep else 'forget'}\t{self.reason}"
        )


@dataclass
class Plan:
    repository: OffsiteRepository
    listed_at: datetime
    verdicts: list[Verdict] = field(default_factory=list)
    gone: list[OffsiteCopy] = field(default_factory=list)  # recorded, not in the listing

    @property
    def forget(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.keep]

    def lines(self) -> list[str]:
        gone = [
            f"{c.vm.name}\t-\t{c.snapshot_id[:8]}\tbackup {c.backup_id}\tgone\t"
            "not in the repository any more (forgotten by its owner?)"
            for c in self.gone
        ]
        return [v.line() for v in self.verdicts] + gone


@dataclass
class Outcome:
    state: str  # ok, nothing, append-only, locked, busy, failed
    message: str
    forgotten: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "nothing", "append-only")


def run(model: OffsiteRepository, holder: str, *, dry_run: bool = False):
    """One pass over ``model`` (``dry_run``: the plan only, nothing changed); returns
    ``(plan or None, Outcome)``. One pass per repository at a time: a second one finds
    it held and says so (a holder whose process is gone, or older than the longest job,
    is taken over)."""
    if dry_run:
        found = plan(model)
        return found, Outcome("dry-run", f"{len(found.forget)} snapshot(s) would be forgotten")
    stale = timezone.now() - timedelta(seconds=settings.Q_TIMEOUT)
    if model.prune_holder and worker.process_alive(model.prune_holder) is False:
        stale = timezone.now()
    if not model.claim_prune(holder, stale):
        # the request that started this pass is spent: a later copy may queue the next one
        OffsiteRepository.objects.filter(pk=model.pk).update(prune_queued_at=None)
        model.refresh_from_db(fields=["prune_holder"])
        return None, Outcome("busy", f"{model.name} is being pruned by {model.prune_holder}")
    found, outcome = None, Outcome("failed", f"stopped before the end ({holder})")
    try:
        restic.unlock(restic_repository(model))  # stale locks only: restic 0.14 obeys them
        found = plan(model)
        outcome = apply(found)
    except restic.ResticError as exc:
        outcome = _refused(exc, "not listed")
    finally:
        model.release_prune(holder, outcome.state, outcome.message)
    return found, outcome


def plan(model: OffsiteRepository) -> Plan:
    """What a pass would do now: read-only (``--dry-run`` prints exactly this)."""
    listed_at = timezone.now()
    snapshots = restic.snapshots(restic_repository(model), [TAG], timeout=settings.Q_TIMEOUT)
    copies = (
        OffsiteCopy.objects.succeeded()
        .filter(repository=model)
        .exclude(snapshot_id="")
        .select_related("backup__policy", "vm")
    )
    by_snapshot = {c.snapshot_id: c for c in copies}
    result = Plan(model, listed_at)
    result.verdicts = decide(model, snapshots, by_snapshot)
    listed = {s.id for s in snapshots}
    result.gone = [
        c
        for c in by_snapshot.values()
        if c.snapshot_id not in listed
        and c.forgotten_at is None
        and c.finished_at is not None
        and c.finished_at < listed_at  # one finished after the listing is not gone
    ]
    return result


def decide(model, snapshots: list[restic.Snapshot], by_snapshot: dict) -> list[Verdict]:
    """Every snapshot's verdict, newest first: the policies' rules per (policy, VM), then
    every ancestor of a kept snapshot kept with it."""
    verdicts = {s.id: Verdict(s, by_snapshot.get(s.id), True, NO_COPY) for s in snapshots}
    groups: dict[tuple, list[Verdict]] = defaultdict(list)
    for verdict in verdicts.values():
        if verdict.copy is None:
            continue
        policy = verdict.copy.backup.policy
        if policy is None or policy.offsite_id != model.pk:
            verdict.reason = NO_RULE
            continue
        groups[(policy.pk, verdict.snapshot.tag("uuid"))].append(verdict)
    tz = timezone.get_current_timezone()
    for group in groups.values():
        policy = group[0].copy.backup.policy
        points = {
            v.copy.pk: rules.Point(
                v.copy.pk, v.copy.backup.created_at, None, v.copy.backup.protected
            )
            for v in group
        }
        by_copy = {v.copy.pk: v for v in group}
        for decision in rules.decide(points.values(), policy.offsite_retention_rules(), tz):
            verdict = by_copy[decision.point.id]
            verdict.keep, verdict.reason = decision.keep, decision.reason
    _keep_parents(list(verdicts.values()))
    return sorted(verdicts.values(), key=lambda v: (v.snapshot.time, v.snapshot.id), reverse=True)


def _keep_parents(verdicts: list[Verdict]) -> None:
    """Each kept snapshot's parents (by the ``parent=`` tag, within its VM), and theirs,
    kept too: a kept incremental restores only with them."""
    by_name: dict[tuple, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_name[(v.snapshot.tag("uuid"), v.snapshot.tag("backup"))].append(v)
    todo = [v for v in verdicts if v.keep]
    while todo:
        child = todo.pop()
        parent = child.snapshot.tag("parent")
        if not parent:
            continue
        for v in by_name.get((child.snapshot.tag("uuid"), parent), []):
            if not v.keep:
                v.keep, v.reason = True, f"parent of kept {child.snapshot.short_id}"
                todo.append(v)


def apply(found: Plan) -> Outcome:
    """Carry out ``found``: forget, then prune; each refusal said in words."""
    model = found.repository
    _mark_gone(found)
    repo = restic_repository(model)
    ids = [v.snapshot.id for v in found.forget]
    kept = [v.snapshot.id for v in found.verdicts if v.keep]
    OffsiteCopy.objects.filter(repository=model, snapshot_id__in=kept).update(forgotten_at=None)
    if not ids:
        return _prune_only(model, repo)
    marked = OffsiteCopy.objects.filter(repository=model, snapshot_id__in=ids)
    marked.update(forgotten_at=timezone.now())
    if OffsiteCopy.objects.filter(repository=model, status=RunStatus.RUNNING).exists():
        marked.update(forgotten_at=None)
        return Outcome("busy", f"a copy to {model.name} is running; its retention waits")
    try:
        restic.forget(repo, ids, timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        marked.update(forgotten_at=None)
        return _refused(exc, f"{len(ids)} snapshot(s) not forgotten")
    for verdict in found.forget:
        if verdict.copy is not None:
            verdict.copy.log("forgotten", repository=model.name, reason=verdict.reason)
    outcome = _prune(repo, f"forgot {len(ids)} snapshot(s)")
    outcome.forgotten = ids
    return outcome


def _mark_gone(found: Plan) -> None:
    for copy in found.gone:
        if OffsiteCopy.objects.filter(pk=copy.pk, forgotten_at=None).update(
            forgotten_at=timezone.now()
        ):
            copy.log("gone", repository=found.repository.name, snapshot=copy.snapshot_id)


def _prune_only(model: OffsiteRepository, repo: restic.Repository) -> Outcome:
    """Nothing to forget: ``restic prune`` only when a pass forgot and could not prune."""
    if model.prune_state == "prune-failed":
        return _prune(repo, "nothing to forget")
    return Outcome("nothing", "nothing to forget")


def _prune(repo: restic.Repository, done: str) -> Outcome:
    try:
        summary = restic.prune(repo, timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        outcome = _refused(exc, f"{done}; prune")
        if outcome.state in ("failed", "locked"):
            outcome.state = "prune-failed"
        return outcome
    last = summary.splitlines()[-1] if summary else ""
    return Outcome("ok", f"{done}; pruned" + (f" ({last})" if last else ""))


def _refused(exc: restic.ResticError, what: str) -> Outcome:
    if exc.reason == restic.Reason.APPEND_ONLY:
        return Outcome("append-only", f"{what}: {exc}")
    if exc.reason == restic.Reason.LOCKED:
        return Outcome("locked", f"{what}: {exc}; retried later")
    return Outcome("failed", f"{what}: {exc}")
