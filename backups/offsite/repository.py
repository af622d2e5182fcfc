"""A repository's own jobs: init (only an empty location; a clear refusal otherwise),
probe, and ``restic check``. Each records what it found on the ``OffsiteRepository`` row
(``probe_*``, ``check_*``) and raises ``OffsiteError`` with the reason when it cannot do
its work, so a command exits non-zero and a job's result says why."""

from __future__ import annotations

from django.conf import settings

from .. import alerts, restic
from ..models import OffsiteRepository
from . import OffsiteError, restic_repository


class Busy(OffsiteError):
    """restic found the repository locked by a live process (a copy, a prune): not a
    failed check, tried again later."""


def probe(model: OffsiteRepository) -> restic.Probe:
    """Is there a repository, and does the password open it? Recorded on the row; a
    repository that cannot be asked (unreachable, locked, no password file) raises."""
    try:
        found = restic.probe(restic_repository(model))
    except restic.ResticError as exc:
        model.record_probe(str(exc.reason), str(exc))
        raise OffsiteError(str(exc)) from exc
    model.record_probe(found.state, found.message)
    return found


def initialize(model: OffsiteRepository) -> str:
    """``restic init`` where there is no repository yet. A repository already there is
    never touched: its password opens it (nothing to do, said so) or it does not (refused:
    another password, or someone else's repository)."""
    found = probe(model)
    if found.state == "wrong-password":
        raise OffsiteError(
            f"not initialized: there is already a repository at {restic_repository(model).display} "
            f"and the password in {model.password_file} does not open it"
        )
    if found.ok:
        raise OffsiteError(
            f"not initialized: {model.name} already is a repository and its password opens "
            "it; nothing to do"
        )
    try:
        repo_id = restic.init(restic_repository(model))
    except restic.ResticError as exc:
        model.record_probe(str(exc.reason), str(exc))
        raise OffsiteError(str(exc)) from exc
    message = f"initialized repository {repo_id} at {restic_repository(model).display}"
    model.record_probe("ok", message)
    return message


def check(model: OffsiteRepository, read_data_subset: str | None = None) -> restic.CheckResult:
    """``restic check`` (with a share of the data read and verified), after removing the
    stale locks a killed copy may have left. Damage found is the result (``ok`` false,
    recorded, alerted; a later good check resolves it); a check that cannot run raises
    (and alerts too), except a locked repository: ``Busy``, nothing recorded."""
    repo = restic_repository(model)
    try:
        subset = restic.subset(read_data_subset) if read_data_subset else ""
    except restic.ResticError as exc:
        raise OffsiteError(str(exc)) from exc
    try:
        restic.unlock(repo)
        result = restic.check(repo, read_data_subset or None, timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        if exc.reason == restic.Reason.LOCKED:
            raise Busy(str(exc)) from exc
        model.record_check(False, subset, f"the check could not run: {exc}")
        alerts.offsite_checked(model)
        raise OffsiteError(str(exc)) from exc
    message = "no errors found" if result.ok else "; ".join(result.errors)
    model.record_check(result.ok, subset, message)
    alerts.offsite_checked(model)
    return result
