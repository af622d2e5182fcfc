"""Dashboard forms; validation errors are written for the operator who reads them."""

import os
import posixpath
import re

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from . import roots
from .models import BackupPolicy, Method, RunStatus, VirtualMachine, VmState
from .restore import rules as restore_rules

# Disk targets as libvirt names them: vda, sdb, hdc, nvme0n1, ...
TARGET_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


LIVE_METHODS = (Method.PUSH, Method.SNAPSHOT, Method.MEMORY)  # need a running domain


class BackupNowForm(forms.Form):
    """ "Back up now" offers only what the VM's state allows (as ``methods.choose`` decides):
    shut off, ``offline``; running or paused, the live methods, and ``offline`` only when
    one of its enabled policies allows a graceful shutdown — the run is then that policy's,
    whose consent the worker checks again."""

    method = forms.ChoiceField(choices=Method.choices, initial=Method.AUTO)

    def __init__(self, *args, vm: VirtualMachine, **kwargs):
        super().__init__(*args, **kwargs)
        self.vm = vm
        self.running = vm.state in (VmState.RUNNING, VmState.PAUSED)
        self.shutdown_policy = None
        if not self.running:
            choices = [(Method.AUTO, "auto (offline)"), (Method.OFFLINE, "offline")]
        else:
            choices = [(Method.AUTO, "auto (push)")] + [(m, m) for m in LIVE_METHODS]
            self.shutdown_policy = (
                vm.policies.filter(enabled=True, shutdown_for_offline=True).order_by("name").first()
            )
            if self.shutdown_policy is not None:
                label = f"offline (graceful shutdown, as policy {self.shutdown_policy} allows)"
                choices.append((Method.OFFLINE, label))
        field = self.fields["method"]
        field.choices = choices
        field.error_messages["invalid_choice"] = (
            f"%(value)s does not fit {vm.name} while it is {vm.state}"
        )

    def policy(self):
        """The policy a run must carry: only an offline backup of a running VM has one."""
        if self.running and self.cleaned_data["method"] == Method.OFFLINE:
            return self.shutdown_policy
        return None


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
            *BackupPolicy.KEEP_FIELDS,
            "notify_to",
            "stale_after_hours",
            "drill_schedule",
            "drill_timeout",
            "drill_command",
            "drill_console_pattern",
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
        self.fields["destination"].help_text = (
            f"blank: {settings.VMBACKUP_ROOT}; else one of the backup roots (VMBACKUP_ROOTS): "
            + ", ".join(roots.configured())
        )

    def clean_schedule(self) -> str:
        """Spaces tidied; the model's validator judges the expression (for the admin too)."""
        return " ".join(self.cleaned_data["schedule"].split())

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


class RestoreForm(forms.Form):
    """Restore ``backup`` as a new domain. The worker checks name and root again; the form
    catches the mistakes an operator can see here, before anything is queued."""

    name = forms.CharField(
        max_length=64, help_text=restore_rules.NAME_HELP, label="New domain name"
    )
    root = forms.ChoiceField(label="Restore into", help_text="the disks go to <root>/<name>/")
    start = forms.BooleanField(required=False, label="Start the new domain when restored")
    instant = forms.BooleanField(
        required=False,
        label="Instant recovery",
        help_text="the domain runs from the backup within seconds (paused unless started) "
        "while its data moves into <root>/<name>/",
    )

    def __init__(self, *args, backup, **kwargs):
        super().__init__(*args, **kwargs)
        self.backup = backup
        # The configured roots at request time; one root is still shown, never implied.
        roots = restore_rules.allowed_roots()
        self.fields["root"].choices = [(root, root) for root in roots]
        if roots:
            self.fields["root"].initial = roots[0]
        suggestion = f"{backup.vm.name}-restored"
        self.fields["name"].initial = suggestion if restore_rules.NAME_RE.match(suggestion) else ""

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if not restore_rules.NAME_RE.match(name):
            raise ValidationError(f"Not a valid domain name; use {restore_rules.NAME_HELP}.")
        host = self.backup.vm.host
        if VirtualMachine.objects.present().filter(host=host, name=name).exists():
            raise ValidationError(f"A domain named {name} already exists on {host.name}.")
        return name


class RestoreDiskForm(forms.Form):
    """One disk of ``backup`` alone, as a new file in a restore root (for attaching by
    hand). The worker checks the file's place again, then the chain."""

    disk = forms.ChoiceField(label="Disk")
    root = forms.ChoiceField(label="Into")
    file = forms.CharField(
        max_length=128, label="File name", help_text=restore_rules.FILE_HELP + "; a new file"
    )

    def __init__(self, *args, backup, **kwargs):
        super().__init__(*args, **kwargs)
        self.backup = backup
        targets = [d.get("target", "") for d in (backup.manifest or {}).get("disks", [])]
        self.fields["disk"].choices = [(t, t) for t in targets if t]
        self.fields["root"].choices = [(r, r) for r in restore_rules.allowed_roots()]

    def clean_file(self) -> str:
        name = self.cleaned_data["file"]
        if not restore_rules.FILE_RE.match(name):
            raise ValidationError(f"Not a valid file name; use {restore_rules.FILE_HELP}.")
        return name

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            restore_rules.check_disk_file(os.path.join(data["root"], data["file"]))
        except restore_rules.RestoreError as exc:
            raise ValidationError(str(exc)) from exc
        return data

    @property
    def to(self) -> str:
        return os.path.join(self.cleaned_data["root"], self.cleaned_data["file"])


class RestoreInPlaceForm(forms.Form):
    """Restore ``backup`` over its own VM: typing the VM's name is the confirmation."""

    confirm = forms.CharField(
        max_length=255,
        strip=False,  # exactly the name: VM names may have spaces at either end
        label="Type the VM's name to confirm",
        help_text="its current disks are replaced by the backup's (and kept beside them)",
    )
    start = forms.BooleanField(required=False, label="Start the VM when restored")

    def __init__(self, *args, backup, **kwargs):
        super().__init__(*args, **kwargs)
        self.backup = backup

    def clean_confirm(self) -> str:
        typed = self.cleaned_data["confirm"]
        if typed != self.backup.vm.name:
            raise ValidationError(f"Type {self.backup.vm.name} exactly to confirm.")
        return typed
