from django.contrib import admin, messages

from . import jobs
from .models import Backup, BackupPolicy, BackupRun, Disk, Host, Trigger, VirtualMachine


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
                run = jobs.request_backup(vm, trigger=Trigger.ADMIN)
                self.message_user(request, f"{vm.name}: backup queued (run {run.pk})")
            except jobs.RunActive as exc:
                self.message_user(request, str(exc), messages.WARNING)

    def has_run_backup_permission(self, request):
        return request.user.has_perm("backups.run_backup")


@admin.register(BackupPolicy)
class BackupPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "schedule", "method", "compression", "keep_last"]
    list_filter = ["enabled", "method"]
    search_fields = ["name"]
    filter_horizontal = ["vms"]


@admin.register(BackupRun)
class BackupRunAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "status", "method", "kind", "trigger", "created_at", "finished_at"]
    list_filter = ["status", "method", "kind", "trigger"]
    search_fields = ["vm__name", "error"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in BackupRun._meta.fields if f.name not in {"id"}]


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
    actions = ["verify_now"]

    @admin.action(description="Verify now", permissions=["verify_backup"])
    def verify_now(self, request, queryset):
        for backup in queryset.select_related("vm__host"):
            jobs.request_verify(backup)
        self.message_user(request, f"{queryset.count()} verification(s) queued")

    def has_verify_backup_permission(self, request):
        return request.user.has_perm("backups.verify_backup")

    readonly_fields = [f.name for f in Backup._meta.fields if f.name not in {"id", "protected"}]
