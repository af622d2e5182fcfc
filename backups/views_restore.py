"""Restore pages: the two restore forms and one disk as a file, the restores list, one
restore with its progress polled like a run's, cancel. Thin, as in ``views``: access
through ``access``, one request call, redirect by URL name."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import access, dashboard, requests
from .forms import RestoreDiskForm, RestoreForm, RestoreInPlaceForm
from .models import Backup, Restore, RestoreMode, VerifyStatus

RESTORES_PER_PAGE = 50


def _backup(request, backup_id: int, perm: str) -> Backup:
    queryset = Backup.objects.select_related("vm", "vm__host", "run", "parent")
    return access.fetch(request, queryset, backup_id, perm)


def restore_refusal(backup: Backup, in_place: bool = False) -> str:
    """Why the dashboard will not restore this backup; empty when it will. The worker checks
    the whole chain again; this only stops what is known to be lost already (here and
    offsite)."""
    if in_place and backup.vm.gone_at:
        return f"{backup.vm.name} is no longer defined on its host; restore it as a new domain."
    if dashboard.reads_offsite(backup) and dashboard.holding(backup):
        return ""
    if backup.pruned_at:
        return "This backup was pruned; there is nothing left to restore."
    if backup.verify_status in (VerifyStatus.CORRUPT, VerifyStatus.MISSING):
        return (
            f"This backup's last verification found it {backup.verify_status}; it cannot be "
            "restored. Restore another backup, or verify this one again if it was repaired."
        )
    return ""


@require_http_methods(["GET", "POST"])
def backup_restore(request, backup_id: int):
    backup = _backup(request, backup_id, access.RESTORE_BACKUP)
    form = RestoreForm(request.POST if request.method == "POST" else None, backup=backup)
    return _restore_page(
        request, backup, form, "backups/backup_restore.html", "as {name}", in_place=False
    )


@require_http_methods(["GET", "POST"])
def backup_restore_in_place(request, backup_id: int):
    backup = _backup(request, backup_id, access.RESTORE_IN_PLACE)
    form = RestoreInPlaceForm(request.POST if request.method == "POST" else None, backup=backup)
    return _restore_page(
        request, backup, form, "backups/backup_restore_in_place.html", "over {name}", True
    )


@require_POST
def backup_restore_disk(request, backup_id: int):
    """One disk as a file: the restore page's second form."""
    backup = _backup(request, backup_id, access.RESTORE_BACKUP)
    refusal = restore_refusal(backup)
    if refusal:
        messages.error(request, refusal)
        return redirect("backup_detail", backup.pk)
    form = RestoreDiskForm(request.POST, backup=backup)
    if form.is_valid():
        disk, to = form.cleaned_data["disk"], form.to
        try:
            restore = requests.request_disk_restore(backup, disk=disk, to=to, user=request.user)
        except requests.RestoreRefused as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Restore of disk {disk} of {backup} to {to} queued.")
            return redirect("restore_detail", restore.pk)
    context = {"backup": backup, "form": RestoreForm(backup=backup), "disk_form": form}
    return render(request, "backups/backup_restore.html", context)


def _restore_page(request, backup: Backup, form, template: str, how: str, in_place: bool):
    """Both restore forms: refused backups go back to their page; a valid form queues the
    restore (the engine's refusal shows on the form), else the form is shown again."""
    refusal = restore_refusal(backup, in_place=in_place)
    if refusal:
        messages.error(request, refusal)
        return redirect("backup_detail", backup.pk)
    if form.is_valid():
        fields = {k: v for k, v in form.cleaned_data.items() if k != "confirm"}
        try:
            restore = requests.request_restore(
                backup,
                **fields,
                in_place=in_place,
                user=request.user,
                from_offsite=dashboard.reads_offsite(backup),
            )
        except requests.RestoreRefused as exc:
            form.add_error(None, str(exc))
        else:
            what = how.format(name=restore.name)
            messages.success(request, f"Restore of {backup} {what} queued.")
            return redirect("restore_detail", restore.pk)
    offsite = dashboard.holding(backup)[:1] if dashboard.reads_offsite(backup) else []
    context = {"backup": backup, "form": form, "offsite": offsite}
    if not in_place and not offsite:  # one disk reads the backup's files here
        context["disk_form"] = RestoreDiskForm(backup=backup)
    return render(request, template, context)


@require_GET
def restore_list(request):
    access.require(request, access.VIEW)
    restores = Restore.objects.select_related("vm", "vm__host", "backup", "requested_by")
    page = Paginator(restores, RESTORES_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "backups/restore_list.html", {"page": page})


def _restore(request, restore_id: int) -> Restore:
    queryset = Restore.objects.select_related("backup__vm__host", "requested_by", "repository")
    return access.fetch(request, queryset, restore_id)


def _restore_perm(restore: Restore) -> str:
    """Who may start a restore of this kind may also cancel it."""
    in_place = restore.mode == RestoreMode.IN_PLACE
    return access.RESTORE_IN_PLACE if in_place else access.RESTORE_BACKUP


def _restore_context(request, restore: Restore) -> dict:
    done, total = restore.bytes_done, restore.bytes_total
    percent = min(100, round(100 * done / total)) if total else None
    can_cancel = request.user.has_perm(_restore_perm(restore))
    return {"restore": restore, "percent": percent, "can_cancel": can_cancel}


@require_POST
def restore_cancel(request, restore_id: int):
    restore = _restore(request, restore_id)
    access.require(request, _restore_perm(restore))
    if restore.is_finished:
        messages.info(request, f"Restore {restore.pk} has already finished ({restore.status}).")
    else:
        requests.request_restore_cancel(restore)
        messages.success(request, f"Cancellation of restore {restore.pk} requested.")
    return redirect("restore_detail", restore.pk)


@require_GET
def restore_detail(request, restore_id: int):
    restore = _restore(request, restore_id)
    return render(request, "backups/restore_detail.html", _restore_context(request, restore))


@require_GET
def restore_progress(request, restore_id: int):
    """The polled fragment; HTTP 286 tells htmx to stop polling once the restore has ended."""
    restore = _restore(request, restore_id)
    response = render(
        request, "backups/partials/restore_progress.html", _restore_context(request, restore)
    )
    if restore.is_finished:
        response.status_code = 286
    return response
