"""Offsite pages: the copies (list, one copy with its progress polled like a run's, cancel),
the repositories with their last check and prune, and "Copy offsite" on a backup. Thin, as
in ``views``: access through ``access``, one request call, redirect by URL name."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from . import access, dashboard, requests
from .forms import RunFilterForm
from .models import Backup, OffsiteCopy, OffsiteRepository

COPIES_PER_PAGE = 50


@require_GET
def copy_list(request):
    """Every copy, newest first (a status filter as on the runs page), and every
    repository with its last check and its last offsite prune."""
    access.require(request, access.VIEW)
    form = RunFilterForm(request.GET)
    copies = OffsiteCopy.objects.select_related("vm", "vm__host", "backup", "repository")
    status = form.cleaned_data["status"] if form.is_valid() else ""
    if status:
        copies = copies.filter(status=status)
    page = Paginator(copies, COPIES_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "form": form,
        "status": status,
        "repositories": OffsiteRepository.objects.all(),
    }
    return render(request, "backups/copy_list.html", context)


def _copy(request, copy_id: int, perm: str = access.VIEW) -> OffsiteCopy:
    queryset = OffsiteCopy.objects.select_related("vm", "vm__host", "backup", "repository", "via")
    return access.fetch(request, queryset, copy_id, perm)


def _copy_context(request, copy: OffsiteCopy) -> dict:
    return {
        "copy": copy,
        "progress": dashboard.progress(copy),
        "links": copy.links.select_related("backup") if copy.pk else [],
        "can_cancel": request.user.has_perm(access.COPY_OFFSITE),
    }


@require_GET
def copy_detail(request, copy_id: int):
    copy = _copy(request, copy_id)
    return render(request, "backups/copy_detail.html", _copy_context(request, copy))


@require_GET
def copy_progress(request, copy_id: int):
    """The polled fragment; HTTP 286 tells htmx to stop polling once the copy has ended."""
    copy = _copy(request, copy_id)
    response = render(request, "backups/partials/copy_progress.html", _copy_context(request, copy))
    if copy.is_finished:
        response.status_code = 286
    return response


@require_POST
def copy_cancel(request, copy_id: int):
    copy = _copy(request, copy_id, access.COPY_OFFSITE)
    if copy.is_finished:
        messages.info(request, f"Copy {copy.pk} has already finished ({copy.status}).")
    else:
        requests.request_copy_cancel(copy)
        messages.success(request, f"Cancellation of copy {copy.pk} requested.")
    return redirect("copy_detail", copy.pk)


@require_POST
def backup_copy(request, backup_id: int):
    """ "Copy offsite": to the repository posted, else the backup's policy's."""
    queryset = Backup.objects.select_related("vm__host", "policy__offsite")
    backup = access.fetch(request, queryset, backup_id, access.COPY_OFFSITE)
    repository = _target(request, backup)
    if repository is None:
        messages.error(request, "Choose an enabled offsite repository to copy this backup to.")
        return redirect("backup_detail", backup.pk)
    try:
        copy = requests.request_offsite_copy(backup, repository)
    except (requests.CopyActive, requests.CopyRefused) as exc:
        messages.warning(request, str(exc))
        return redirect("backup_detail", backup.pk)
    messages.success(request, f"Copy of {backup} to {repository.name} queued.")
    return redirect("copy_detail", copy.pk)


def _target(request, backup: Backup) -> OffsiteRepository | None:
    enabled = OffsiteRepository.objects.filter(enabled=True)
    chosen = request.POST.get("repository", "")
    if chosen.isdigit():
        return enabled.filter(pk=int(chosen)).first()
    if backup.policy is not None and backup.policy.offsite_id is not None:
        return enabled.filter(pk=backup.policy.offsite_id).first()
    return None
