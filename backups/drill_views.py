"""Restore drills in the dashboard: the buttons (a VM's newest backup, one backup), the
drill's page with its evidence, the polled progress and the screenshot. Thin, as ``views``:
the worker runs the drill; nothing here waits on libvirt."""

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from . import access, requests
from .models import Backup, Drill, Trigger, VirtualMachine


def _request(request, backup: Backup, back):
    try:
        drill = requests.request_drill(backup, trigger=Trigger.BUTTON, user=request.user)
    except requests.DrillRefused as exc:
        messages.warning(request, str(exc))
        return back
    messages.success(request, f"Restore drill of {backup} queued.")
    return redirect("drill_detail", drill.pk)


@require_POST
def vm_drill(request, vm_id: int):
    """Drill the VM's newest backup that verification has not found corrupt."""
    vm = access.fetch(request, VirtualMachine, vm_id, access.RESTORE_BACKUP)
    backup = requests.newest_drillable(vm)
    if backup is None:
        messages.error(request, f"{vm.name} has no usable backup to drill.")
        return redirect("vm_detail", vm.pk)
    return _request(request, backup, redirect("vm_detail", vm.pk))


@require_POST
def backup_drill(request, backup_id: int):
    queryset = Backup.objects.select_related("vm__host", "policy")
    backup = access.fetch(request, queryset, backup_id, access.RESTORE_BACKUP)
    return _request(request, backup, redirect("backup_detail", backup.pk))


def _drill(request, drill_id: int) -> Drill:
    queryset = Drill.objects.select_related("vm__host", "backup", "policy", "requested_by")
    return access.fetch(request, queryset.defer("screenshot"), drill_id)


def _context(drill: Drill) -> dict:
    has_screenshot = Drill.objects.filter(pk=drill.pk, screenshot__isnull=False).exists()
    return {"drill": drill, "has_screenshot": has_screenshot}


@require_GET
def drill_detail(request, drill_id: int):
    drill = _drill(request, drill_id)
    return render(request, "backups/drill_detail.html", _context(drill))


@require_GET
def drill_progress(request, drill_id: int):
    """The polled fragment; HTTP 286 tells htmx to stop polling once the drill has ended."""
    drill = _drill(request, drill_id)
    response = render(request, "backups/partials/drill_progress.html", _context(drill))
    if drill.is_finished:
        response.status_code = 286
    return response


@require_GET
def drill_screenshot(request, drill_id: int):
    """The sandbox's screen as the drill saw it (a PNG the worker checked or made)."""
    drill = _drill(request, drill_id)
    png = Drill.objects.filter(pk=drill.pk).values_list("screenshot", flat=True).first()
    if not png:
        raise Http404("this drill has no screenshot")
    response = HttpResponse(bytes(png), content_type="image/png")
    response["Content-Security-Policy"] = "default-src 'none'"
    response["X-Content-Type-Options"] = "nosniff"
    return response
