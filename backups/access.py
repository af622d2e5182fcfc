"""Who may see and do what in the dashboard: one place for every permission check.

Permissions come from Django groups (superusers have all). Login itself is enforced by
``LoginRequiredMiddleware``; these helpers turn a missing permission into 403 and a missing
object into 404, in that order, so an outsider cannot probe which ids exist.
"""

from typing import TypeVar

from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.shortcuts import get_object_or_404

VIEW = "backups.view_virtualmachine"
RUN_BACKUP = "backups.run_backup"
VERIFY_BACKUP = "backups.verify_backup"
PROTECT_BACKUP = "backups.change_backup"
RESTORE_BACKUP = "backups.restore_backup"
RESTORE_IN_PLACE = "backups.restore_in_place"  # overwrites a VM's disks: granted apart
CHANGE_POLICY = "backups.change_backuppolicy"
ADD_POLICY = "backups.add_backuppolicy"
COPY_OFFSITE = "backups.copy_offsite"  # copy a backup offsite, cancel a copy

M = TypeVar("M", bound=Model)


def require(request, perm: str) -> None:
    """403 unless the user holds ``perm``; reading pages also needs the view permission."""
    user = request.user
    if not user.has_perm(VIEW) or not user.has_perm(perm):
        raise PermissionDenied


def fetch(request, queryset: QuerySet[M] | type[M], pk: int, perm: str = VIEW) -> M:
    """The object the URL names, after the permission check: 403 before 404."""
    require(request, perm)
    return get_object_or_404(queryset, pk=pk)
