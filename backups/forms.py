"""Dashboard forms; validation errors are written for the operator who reads them."""

import posixpath
import re

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from . import cron
from .models import BackupPolicy, Method, RunStatus, VirtualMachine

# Disk targets as libvirt names them: vda, sdb, hdc, nvme0n1, ...
TARGET_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class BackupNowForm(forms.Form):
    method = forms.ChoiceField(choices=Method.choices, initial=Method.AUTO)


class ReturnToForm(forms.Form):
    """Where a button posted from; a fixed choice, never a URL taken from the request."""

    return_to = forms.ChoiceField(
        choices=[("backup", "backup"), ("vm", "vm")], required=False, initial="backup"
    )


class RunFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "any status"), *RunStatus.choices], required=False)


class PolicyForm(forms.ModelForm):
    vms = forms.ModelMultipleChoiceField(
        queryset=VirtualMachine.objects.none(),
        widget=forms.CheckboxSelectMultiple,
        required=False,
        label="VMs",
    )

    class Meta:
        model = BackupPolicy
        fields = [
            "name",
            "enabled",
            "vms",
            "schedule",
            "method",
            "compression",
            "exclude_disks",
            "shutdown_for_offline",
            "verify_after",
            "destination",
            "full_every",
            "keep_last",
            "keep_hourly",
            "keep_daily",
            "keep_weekly",
            "keep_monthly",
            "keep_yearly",
            "notify_to",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Present VMs, plus vanished ones the policy still names so saving does not drop them.
        present = VirtualMachine.objects.present()
        if self.instance.pk:
            present = present | VirtualMachine.objects.filter(policies=self.instance)
        self.fields["vms"].queryset = (
            present.distinct().select_related("host").order_by("name", "host__name")
        )
        self.fields["vms"].label_from_instance = lambda vm: f"{vm.name} ({vm.host.name})"

    def clean_schedule(self) -> str:
        value = " ".join(self.cleaned_data["schedule"].split())
        if value:
            try:
                cron.parse(value)
            except cron.CronError as exc:
                raise ValidationError(f"Not a valid cron expression: {exc}") from exc
        return value

    def clean_destination(self) -> str:
        value = self.cleaned_data["destination"].strip()
        if not value:
            return value
        if not value.startswith("/"):
            raise ValidationError("Use an absolute path, e.g. /var/backups/vms.")
        if ".." in value.split("/"):
            raise ValidationError("The path must not contain '..'.")
        normalized = posixpath.normpath(value)
        if normalized == "/":
            raise ValidationError("Refusing to use / as a backup root.")
        return normalized

    def clean_exclude_disks(self) -> str:
        targets = [t.strip() for t in self.cleaned_data["exclude_disks"].split(",") if t.strip()]
        bad = [t for t in targets if not TARGET_RE.match(t)]
        if bad:
            raise ValidationError(
                "Disk targets are simple names such as vda or sdb, separated by commas; "
                f"not valid: {', '.join(bad)}"
            )
        return ", ".join(dict.fromkeys(targets))

    def clean_notify_to(self) -> str:
        emails = [e.strip() for e in self.cleaned_data["notify_to"].split(",") if e.strip()]
        for email in emails:
            try:
                validate_email(email)
            except ValidationError as exc:
                raise ValidationError(f"Not an email address: {email}") from exc
        return ", ".join(emails)
