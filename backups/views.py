"""Thin views: fetch through one helper, call one model or job function, render or redirect."""

from django.db.models import Prefetch
from django.shortcuts import get_object_or_404, render

from .models import Backup, BackupRun, Disk, Host, VirtualMachine


def overview(request):
    vms = (
        VirtualMachine.objects.present()
        .select_related("host")
        .prefetch_related(Prefetch("disks", queryset=Disk.objects.order_by("target")))
    )
    hosts = Host.objects.all()
    return render(request, "backups/overview.html", {"hosts": hosts, "vms": vms})


def vm_detail(request, vm_id: int):
    vm = get_object_or_404(VirtualMachine.objects.select_related("host"), pk=vm_id)
    return render(
        request,
        "backups/vm_detail.html",
        {"vm": vm, "runs": vm.runs.all()[:20], "backups": vm.backups.published()},
    )


def run_detail(request, run_id: int):
    run = get_object_or_404(BackupRun.objects.select_related("vm"), pk=run_id)
    return render(request, "backups/run_detail.html", {"run": run})


def backup_detail(request, backup_id: int):
    backup = get_object_or_404(Backup.objects.select_related("vm"), pk=backup_id)
    return render(request, "backups/backup_detail.html", {"backup": backup})
