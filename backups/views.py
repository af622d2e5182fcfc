"""Thin views: check access and fetch through ``access``, call one model or job function,
render or redirect by URL name. Mutations are POST-only; nothing here waits on libvirt."""

import json
import re

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import access, charts, cron, dashboard, requests, views_restore
from .archive import ArchiveError, Manifest, instructions
from .forms import (
    BackupNowForm,
    PolicyForm,
    ReturnToForm,
    RunFilterForm,
)
from .models import (
    Backup,
    BackupPolicy,
    BackupRun,
    Host,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
    Trigger,
    VirtualMachine,
)

RUNS_PER_PAGE = 50
RESTORES_SHOWN = 10  # the newest restores of a backup, on its page
DRILLS_SHOWN = 5  # the newest drills of a VM or a backup, on its page
CHART_RUNS = 50


# --- overview --------------------------------------------------------------------------------


@require_GET
def overview(request):
    access.require(request, access.VIEW)
    state = request.GET.get("state", "")
    state = state if state in dashboard.STATES else ""
    host = request.GET.get("host", "")
    q = request.GET.get("q", "").strip()
    context = dashboard.overview(state=state, host=host, q=q, page=request.GET.get("page"))
    context.update(
        filters={"state": state, "host": host, "q": q},
        filtered=bool(state or host or q),
        states=[
            (s, dashboard.STATE_LABELS[s], context["state_counts"][s]) for s in dashboard.STATES
        ],
        hosts=list(Host.objects.all()),
        has_policies=BackupPolicy.objects.exists(),
        root_totals=dashboard.root_totals(),
        workers=dashboard.workers_online(),
    )
    return render(request, "backups/overview.html", context)


# --- VM --------------------------------------------------------------------------------------


def _chart(vm: VirtualMachine) -> str:
    rows = (
        vm.runs.filter(status__in=dashboard.RESULT_STATUSES, started_at__isnull=False)
        .order_by("-created_at", "-id")
        .values("pk", "status", "started_at", "finished_at", "bytes_written", "backup__size_bytes")[
            :CHART_RUNS
        ]
    )
    points = [
        charts.RunPoint(
            when=timezone.localtime(row["started_at"]),
            size_bytes=row["backup__size_bytes"] or row["bytes_written"] or 0,
            seconds=(row["finished_at"] - row["started_at"]).total_seconds()
            if row["finished_at"]
            else None,
            ok=row["status"] == RunStatus.SUCCEEDED,
            label=f"run {row['pk']} {row['status']}",
        )
        for row in rows
    ]
    # Safe: runs_chart escapes every piece of text it writes.
    return mark_safe(charts.runs_chart(points))  # noqa: S308


@require_GET
def vm_detail(request, vm_id: int):
    vm = access.fetch(request, VirtualMachine.objects.select_related("host"), vm_id)
    backups = list(vm.backups.restorable().select_related("run"))
    context = {
        "vm": vm,
        "disks": vm.disks.all(),
        "policies": vm.policies.all(),
        "chain": dashboard.chain_rows(backups),
        "backup_count": len(backups),
        "storage_bytes": sum(b.size_bytes for b in backups if b.is_local),
        "runs": vm.runs.all()[:20],
        "drills": vm.drills.select_related("backup").defer("screenshot")[:DRILLS_SHOWN],
        "last_drill": vm.drills.judged().defer("screenshot").first(),
        "active_drill": vm.drills.active().defer("screenshot").first(),
        "offsite_copy": _newest_copy(vm),
        "active_run": vm.runs.active().first(),
        "chart": _chart(vm),
        "backup_form": BackupNowForm(vm=vm),
    }
    return render(request, "backups/vm_detail.html", context)


def _newest_copy(vm: VirtualMachine) -> OffsiteCopy | None:
    """The copy of the VM's newest backup that is offsite now (its age is the VM's
    offsite protection)."""
    copies = OffsiteCopy.objects.succeeded().filter(vm=vm, forgotten_at__isnull=True)
    return copies.select_related("backup", "repository").order_by("-backup__created_at").first()


@require_GET
def host_detail(request, host_id: int):
    """A hypervisor host: its connection, its VMs, and what reconcile found there that
    another installation left (never touched, shown so someone can look)."""
    host = access.fetch(request, Host, host_id)
    context = {"host": host, "vms": host.vms.order_by("name")}
    return render(request, "backups/host_detail.html", context)


@require_POST
def vm_backup(request, vm_id: int):
    vm = access.fetch(
        request, VirtualMachine.objects.select_related("host"), vm_id, access.RUN_BACKUP
    )
    form = BackupNowForm(request.POST, vm=vm)
    if vm.gone_at:
        messages.error(request, f"{vm.name} is gone from libvirt; it cannot be backed up.")
        return redirect("vm_detail", vm.pk)
    if not form.is_valid():
        reasons = " ".join(form.errors.get("method", []))
        messages.error(request, f"Choose a backup method. {reasons}".strip())
        return redirect("vm_detail", vm.pk)
    try:
        run = requests.request_backup(
            vm, method=form.cleaned_data["method"], trigger=Trigger.BUTTON, policy=form.policy()
        )
    except requests.RunActive as exc:
        messages.warning(request, str(exc))
        return redirect("vm_detail", vm.pk)
    messages.success(request, f"Backup of {vm.name} queued.")
    return redirect("run_detail", run.pk)


# --- runs ------------------------------------------------------------------------------------


@require_GET
def run_list(request):
    access.require(request, access.VIEW)
    form = RunFilterForm(request.GET)
    runs = BackupRun.objects.select_related("vm", "vm__host", "policy")
    status = form.cleaned_data["status"] if form.is_valid() else ""
    if status:
        runs = runs.filter(status=status)
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "backups/run_list.html", {"page": page, "form": form, "status": status})


def _run(request, run_id: int, perm: str = access.VIEW) -> BackupRun:
    return access.fetch(
        request, BackupRun.objects.select_related("vm", "vm__host", "policy"), run_id, perm
    )


@require_GET
def run_detail(request, run_id: int):
    run = _run(request, run_id)
    return render(
        request,
        "backups/run_detail.html",
        {"run": run, "progress": dashboard.progress(run)},
    )


@require_GET
def run_progress(request, run_id: int):
    """The polled fragment; HTTP 286 tells htmx to stop polling once the run has finished."""
    run = _run(request, run_id)
    response = render(
        request,
        "backups/partials/run_progress.html",
        {"run": run, "progress": dashboard.progress(run)},
    )
    if run.is_finished:
        response.status_code = 286
    return response


@require_POST
def run_cancel(request, run_id: int):
    run = _run(request, run_id, access.RUN_BACKUP)
    if run.is_finished:
        messages.info(request, f"Run {run.pk} has already finished ({run.status}).")
    else:
        requests.request_cancel(run)
        messages.success(request, f"Cancellation of run {run.pk} requested.")
    return redirect("run_detail", run.pk)


# --- backups ---------------------------------------------------------------------------------


def _backup(request, backup_id: int, perm: str = access.VIEW) -> Backup:
    queryset = Backup.objects.select_related("vm", "vm__host", "run", "parent")
    return access.fetch(request, queryset, backup_id, perm)


@require_GET
def backup_detail(request, backup_id: int):
    backup = _backup(request, backup_id)
    manifest = backup.manifest or {}
    offsite = dashboard.holding(backup)
    context = {
        "backup": backup,
        "offsite": offsite,
        "from_offsite": bool(offsite) and dashboard.reads_offsite(backup),
        "manifest": manifest,
        "disks": manifest.get("disks") or [],
        "skipped": manifest.get("skipped") or [],
        "children": backup.children.published(),
        "restore_refusal": views_restore.restore_refusal(backup),
        "restores": backup.restores.select_related("requested_by")[:RESTORES_SHOWN],
        "pinned_by": Restore.objects.pinning(backup),
        "drills": backup.drills.select_related("backup").defer("screenshot")[:DRILLS_SHOWN],
        "copies": backup.offsite_copies.select_related("repository")[:RESTORES_SHOWN],
        "repositories": OffsiteRepository.objects.filter(enabled=True),
    }
    return render(request, "backups/backup_detail.html", context)


def _back(backup: Backup, request):
    target = ReturnToForm(request.POST)
    if target.is_valid() and target.cleaned_data["return_to"] == "vm":
        return redirect("vm_detail", backup.vm_id)
    return redirect("backup_detail", backup.pk)


@require_POST
def backup_verify(request, backup_id: int):
    backup = _backup(request, backup_id, access.VERIFY_BACKUP)
    if backup.pruned_at:
        messages.error(request, "This backup was pruned; there is nothing left to verify.")
    else:
        try:
            requests.request_verify(backup)
            messages.success(request, f"Verification of {backup} queued.")
        except requests.VerifyQueued as exc:
            messages.info(request, f"{exc} It was not queued again.")
    return _back(backup, request)


@require_POST
def backup_protect(request, backup_id: int):
    """Set ``protected`` to the posted value (toggle when none is posted: double posts are safe
    with a value, so the templates always send one)."""
    backup = _backup(request, backup_id, access.PROTECT_BACKUP)
    wanted = request.POST.get("protected")
    backup.protected = (wanted == "1") if wanted in {"0", "1"} else not backup.protected
    backup.save(update_fields=["protected"])
    state = "protected from pruning" if backup.protected else "no longer protected"
    messages.success(request, f"{backup} is {state}.")
    return _back(backup, request)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "backup"


def _download(backup: Backup, suffix: str, body: str, content_type: str) -> HttpResponse:
    stamp = timezone.localtime(backup.created_at).strftime("%Y%m%dT%H%M%S")
    filename = f"{_safe(backup.vm.name)}-{stamp}-{suffix}"
    response = HttpResponse(body, content_type=content_type)
    response["Content-Disposition"] = content_disposition_header(True, filename)
    response["X-Content-Type-Options"] = "nosniff"
    return response


def render_restore_md(manifest: dict) -> str:
    """RESTORE.md for a stored manifest (``archive.instructions`` owns the wording)."""
    return instructions.restore_md(Manifest.from_json(json.dumps(manifest)))


def render_restore_sh(manifest: dict) -> str:
    return instructions.restore_sh(Manifest.from_json(json.dumps(manifest)))


def _manifest(backup: Backup) -> dict:
    if not backup.manifest:
        raise Http404("No manifest is recorded for this backup.")
    return backup.manifest


@require_GET
def backup_manifest(request, backup_id: int):
    backup = _backup(request, backup_id)
    body = json.dumps(_manifest(backup), indent=2, sort_keys=True) + "\n"
    return _download(backup, "backup.json", body, "application/json")


def _restore_download(backup: Backup, render_text, suffix: str, content_type: str):
    try:
        body = render_text(_manifest(backup))
    except ArchiveError as exc:
        return HttpResponse(
            f"The stored manifest cannot be turned into restore instructions: {exc}\n",
            status=409,
            content_type="text/plain; charset=utf-8",
        )
    return _download(backup, suffix, body, content_type)


@require_GET
def backup_restore_md(request, backup_id: int):
    backup = _backup(request, backup_id, access.RESTORE_BACKUP)
    return _restore_download(
        backup, render_restore_md, "RESTORE.md", "text/markdown; charset=utf-8"
    )


@require_GET
def backup_restore_sh(request, backup_id: int):
    backup = _backup(request, backup_id, access.RESTORE_BACKUP)
    return _restore_download(
        backup, render_restore_sh, "restore.sh", "text/x-shellscript; charset=utf-8"
    )


# --- policies --------------------------------------------------------------------------------


@require_GET
def policy_list(request):
    access.require(request, access.VIEW)
    policies = BackupPolicy.objects.prefetch_related("vms")
    next_runs = dashboard.schedule_next_runs(policies)
    rows = [(p, next_runs.get(p.pk)) for p in policies]
    return render(request, "backups/policy_list.html", {"rows": rows})


def _policy_preview(form: PolicyForm) -> dict:
    """Next runs and the retention dry-run for what the form currently says."""
    if form.is_bound:
        values = getattr(form, "cleaned_data", {})
    else:
        values = {name: form.initial.get(name, form.fields[name].initial) for name in form.fields}
        values["vms"] = form.instance.vms.all() if form.instance.pk else []
    runs, cron_error = [], ""
    if form.is_bound and "schedule" in form.errors:
        cron_error = " ".join(form.errors["schedule"])
    schedule = values.get("schedule")
    if schedule:
        try:
            runs = cron.next_runs(schedule, timezone.localtime(), 5)
        except cron.CronError as exc:
            cron_error = str(exc)
    vms = list(values.get("vms") or [])
    keep_ok = all(name in values for name in BackupPolicy.KEEP_FIELDS)
    return {
        "next_runs": runs,
        "cron_error": cron_error,
        "retention": (dashboard.retention_preview(values, vms, form.instance) if keep_ok else None),
    }


def _policy_form(request, policy: BackupPolicy | None):
    form = PolicyForm(request.POST or None, instance=policy)
    if request.method == "POST" and form.is_valid() and "preview" not in request.POST:
        saved = form.save()
        messages.success(request, f"Policy {saved.name} saved.")
        return redirect("policy_list")
    context = {"form": form, "policy": policy, **_policy_preview(form)}
    return render(request, "backups/policy_edit.html", context)


@require_http_methods(["GET", "POST"])
def policy_create(request):
    access.require(request, access.ADD_POLICY)
    return _policy_form(request, None)


@require_http_methods(["GET", "POST"])
def policy_edit(request, policy_id: int):
    policy = access.fetch(request, BackupPolicy, policy_id, access.CHANGE_POLICY)
    return _policy_form(request, policy)
