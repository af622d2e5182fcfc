# backups precedes django_q in INSTALLED_APPS (its qcluster replaces django-q2's): django-q2's
# admins are registered here first, then made read-only below
import django_q.admin  # noqa: F401
from django.contrib import admin, messages
from django_q.models import Failure, OrmQ, Schedule, Success

from . import alerts, requests
from .models import (
    Alert,
    Backup,
    BackupPolicy,
    BackupRun,
    CopyTrigger,
    Disk,
    Drill,
    Host,
    OffsiteCopy,
    OffsiteRepository,
    Trigger,
    VirtualMachine,
)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "uri", "cluster", "last_sync_at", "last_sync_error"]
    search_fields = ["name", "uri"]
    readonly_fields = ["last_sync_at", "last_sync_error"]


class DiskInline(admin.TabularInline):
    model = Disk
    extra = 0
    can_delete = False
    readonly_fields = [f.name for f in Disk._meta.fields if f.name != "id"]


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = ["name", "host", "state", "uuid", "last_seen_at", "gone_at"]
    list_filter = ["host", "state", ("gone_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "uuid"]
    readonly_fields = [
        "host",
        "uuid",
        "name",
        "state",
        "persistent",
        "loader",
        "nvram",
        "has_tpm",
        "has_agent_channel",
        "domain_xml",
        "first_seen_at",
        "last_seen_at",
        "gone_at",
    ]
    inlines = [DiskInline]
    actions = ["back_up_now"]

    @admin.action(description="Back up now", permissions=["run_backup"])
    def back_up_now(self, request, queryset):
        """The same job as the dashboard's button; a VM already busy is reported, not queued."""
        for vm in queryset.select_related("host"):
            try:
                run = requests.request_backup(vm, trigger=Trigger.ADMIN)
                self.message_user(request, f"{vm.name}: backup queued (run {run.pk})")
            except requests.RunActive as exc:
                self.message_user(request, str(exc), messages.WARNING)

    def has_run_backup_permission(self, request):
        return request.user.has_perm("backups.run_backup")


@admin.register(BackupPolicy)
class BackupPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "schedule", "method", "compression", "keep_last"]
    list_filter = ["enabled", "method"]
    search_fields = ["name"]
    filter_horizontal = ["vms"]
    actions = ["send_test_mail"]

    @admin.action(description="Send a test mail to its recipients", permissions=["change"])
    def send_test_mail(self, request, queryset):
        """Proves the mail path before a failure needs it: each policy's notify_to, or the
        site's VMBACKUP_NOTIFY_TO when it has none (who hears about it then)."""
        for policy in queryset:
            to = alerts.recipients([policy])
            try:
                alerts.send_test_mail(to, who=request.user.get_username())
            except Exception as exc:  # shown to the admin: that is the point of the test
                self.message_user(request, f"{policy.name}: not sent: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{policy.name}: test mail sent to {', '.join(to)}")


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """What was raised and whom it reached; written by the jobs only."""

    list_display = ["raised_at", "kind", "about", "subject", "fired_at", "resolved_at", "mailed_at"]
    list_filter = ["kind", "resolved_at"]
    search_fields = ["about", "subject", "key"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(BackupRun)
class BackupRunAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "status", "method", "kind", "trigger", "created_at", "finished_at"]
    list_filter = ["status", "method", "kind", "trigger"]
    search_fields = ["vm__name", "error"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in BackupRun._meta.fields if f.name not in {"id"}]


@admin.register(Drill)
class DrillAdmin(admin.ModelAdmin):
    """Restore drills, as the jobs recorded them (requested from the dashboard, a policy's
    drill schedule or ``vmbackup_drill``)."""

    list_display = ["id", "vm", "status", "result", "alive_after_seconds", "trigger", "created_at"]
    list_filter = ["status", "result", "trigger"]
    search_fields = ["vm__name", "error", "name"]
    date_hierarchy = "created_at"
    exclude = ["screenshot"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Backup)
class BackupAdmin(admin.ModelAdmin):
    list_display = [
        "vm",
        "created_at",
        "kind",
        "method",
        "consistency",
        "verify_status",
        "protected",
    ]
    list_filter = ["kind", "method", "verify_status", "protected"]
    search_fields = ["vm__name", "path"]
    actions = ["verify_now", "copy_offsite"]

    @admin.action(description="Copy to its policy's offsite repository", permissions=["copy"])
    def copy_offsite(self, request, queryset):
        for backup in queryset.select_related("vm__host", "policy__offsite"):
            repository = backup.policy.offsite if backup.policy else None
            if repository is None:
                self.message_user(
                    request, f"{backup}: its policy names no offsite repository", messages.WARNING
                )
                continue
            try:
                copy = requests.request_offsite_copy(backup, repository, trigger=CopyTrigger.ADMIN)
                self.message_user(request, f"{backup}: copy to {repository} queued ({copy.pk})")
            except (requests.CopyActive, requests.CopyRefused) as exc:
                self.message_user(request, f"{backup}: {exc}", messages.WARNING)

    def has_copy_permission(self, request):
        return request.user.has_perm("backups.copy_offsite")

    @admin.action(description="Verify now", permissions=["verify_backup"])
    def verify_now(self, request, queryset):
        queued, busy = 0, 0
        for backup in queryset.select_related("vm__host"):
            try:
                requests.request_verify(backup)
                queued += 1
            except requests.VerifyQueued:
                busy += 1
        self.message_user(request, f"{queued} verification(s) queued")
        if busy:
            self.message_user(
                request,
                f"{busy} backup(s) already had a verification queued or running; not queued again",
                messages.WARNING,
            )

    def has_verify_backup_permission(self, request):
        return request.user.has_perm("backups.verify_backup")

    readonly_fields = [f.name for f in Backup._meta.fields if f.name not in {"id", "protected"}]


@admin.register(OffsiteRepository)
class OffsiteRepositoryAdmin(admin.ModelAdmin):
    """Where copies go; init and check run on the repository's cluster (its password file
    is on the workers, not here), and what they found shows in the probe/check columns."""

    list_display = [
        "name", "url", "enabled", "cluster", "probe_state", "checked_at", "check_ok",
        "prune_state",
    ]  # fmt: skip
    list_filter = ["enabled"]
    search_fields = ["name", "url"]
    readonly_fields = [
        "created_at",
        "probed_at",
        "probe_state",
        "probe_message",
        "checked_at",
        "check_ok",
        "check_subset",
        "check_message",
        "prune_queued_at",
        "prune_holder",
        "prune_since",
        "pruned_at",
        "prune_state",
        "prune_message",
    ]
    actions = ["initialize", "check_now", "prune_now"]

    @admin.action(
        description="Initialize (restic init, only where no repository is)", permissions=["init"]
    )
    def initialize(self, request, queryset):
        """Queued: the worker that holds the password file runs it. A repository already
        there is never touched; the refusal (wrong password, already initialized) shows
        in its probe columns."""
        for repository in queryset:
            requests.request_offsite_init(repository)
            self.message_user(
                request,
                f"{repository}: restic init queued on cluster {repository.cluster or '(default)'};"
                " the outcome shows in its probe state",
            )

    @admin.action(description="Check now (restic check, structure only)", permissions=["change"])
    def check_now(self, request, queryset):
        for repository in queryset:
            requests.request_offsite_check(repository)
            self.message_user(request, f"{repository}: restic check queued")

    @admin.action(
        description="Apply offsite retention now (forget, then prune)", permissions=["change"]
    )
    def prune_now(self, request, queryset):
        """The pass a copy asks for after it succeeds; the outcome shows in the prune columns
        (``vmbackup_offsite prune --dry-run`` shows the plan first)."""
        for repository in queryset:
            queued = requests.request_offsite_prune(repository)
            self.message_user(
                request, f"{repository}: " + ("queued" if queued else "one is queued already")
            )

    def has_init_permission(self, request):
        return request.user.has_perm("backups.init_repository")


@admin.register(OffsiteCopy)
class OffsiteCopyAdmin(admin.ModelAdmin):
    """Written by the copy jobs only, and kept: a row is the record of where a snapshot
    is (deleting it would make the chain look incomplete offsite)."""

    list_display = [
        "id", "backup", "repository", "status", "trigger", "created_at", "verified_at",
        "forgotten_at",
    ]  # fmt: skip
    list_filter = ["status", "repository", "trigger"]
    search_fields = ["vm__name", "snapshot_id", "error"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """django-q2's queue, schedules and task results, shown but never written from here.

    A schedule's ``func`` (and a queued task's payload) names any callable, which the worker
    runs as root: editing them from a web form would make the admin a root shell. Our
    schedules are written by ``vmbackup_schedules``; results are kept for reading only.
    """

    actions = None  # django-q2's "resubmit" would run a stored task again

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def _read_only_django_q() -> None:
    for model in (Schedule, Success, Failure, OrmQ):
        if admin.site.is_registered(model):
            base = type(admin.site.get_model_admin(model))
            admin.site.unregister(model)
            admin.site.register(model, type(f"ReadOnly{base.__name__}", (ReadOnlyAdmin, base), {}))


_read_only_django_q()
