"""Model field validators: every form that saves a model (the dashboard's and the admin's)
runs them through ``full_clean``, so no form can store what the worker would refuse."""

import os
import re
import shlex

from django.core.exceptions import ValidationError

from . import cron, roots, uris
from .restic_parse import url_problem


def validate_libvirt_uri(value: str) -> None:
    reason = uris.refusal(value)
    if reason:
        raise ValidationError(reason, code="libvirt_uri")


def validate_backup_root(value: str) -> None:
    """A policy destination: one of the configured roots (blank, the default, is not run)."""
    if roots.refusal(value):
        allowed = ", ".join(roots.configured())
        raise ValidationError(
            f"{value} is not a configured backup root; use one of: {allowed} "
            "(or leave blank for VMBACKUP_ROOT). Roots are set by VMBACKUP_ROOTS.",
            code="backup_root",
        )


def validate_cron(value: str) -> None:
    try:
        cron.parse(value)
    except cron.CronError as exc:
        raise ValidationError(f"Not a valid cron expression: {exc}", code="cron") from exc


def validate_restic_url(value: str) -> None:
    """Checked again by ``restic.Repository`` before restic is run."""
    problem = url_problem(value)
    if problem:
        raise ValidationError(problem, code="restic_url")


def validate_password_file(value: str) -> None:
    """A path on the worker hosts (this machine may not have it): only its shape here."""
    if not os.path.isabs(value) or re.search(r"[\x00-\x1f\x7f]", value):
        raise ValidationError("an absolute path, one line", code="password_file")


def drill_argv(value: str) -> list[str]:
    """A drill's guest command as argv (``guest-exec`` runs no shell): shell-like quoting,
    an absolute program path first. Raises ValueError with the reason."""
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("one line, no control characters")
    argv = shlex.split(value)
    if argv and not argv[0].startswith("/"):
        raise ValueError("the program must be an absolute path in the guest (no shell runs it)")
    return argv


def validate_drill_command(value: str) -> None:
    try:
        drill_argv(value)
    except ValueError as exc:
        raise ValidationError(f"Not a usable guest command: {exc}", code="drill_command") from exc


def validate_console_pattern(value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValidationError(f"Not a valid regular expression: {exc}", code="pattern") from exc
