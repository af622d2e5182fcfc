from django.urls import path

from . import metrics, views, views_offsite

urlpatterns = [
    path("", views.overview, name="overview"),
    path("hosts/<int:host_id>/", views.host_detail, name="host_detail"),
    path("vms/<int:vm_id>/", views.vm_detail, name="vm_detail"),
    path("vms/<int:vm_id>/backup/", views.vm_backup, name="vm_backup"),
    path("runs/", views.run_list, name="run_list"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/progress/", views.run_progress, name="run_progress"),
    path("runs/<int:run_id>/cancel/", views.run_cancel, name="run_cancel"),
    path("backups/<int:backup_id>/", views.backup_detail, name="backup_detail"),
    path("backups/<int:backup_id>/verify/", views.backup_verify, name="backup_verify"),
    path("backups/<int:backup_id>/protect/", views.backup_protect, name="backup_protect"),
    path("backups/<int:backup_id>/backup.json", views.backup_manifest, name="backup_manifest"),
    path("backups/<int:backup_id>/RESTORE.md", views.backup_restore_md, name="backup_restore_md"),
    path("backups/<int:backup_id>/restore.sh", views.backup_restore_sh, name="backup_restore_sh"),
    path("backups/<int:backup_id>/restore/", views.backup_restore, name="backup_restore"),
    path(
        "backups/<int:backup_id>/restore-in-place/",
        views.backup_restore_in_place,
        name="backup_restore_in_place",
    ),
    path("backups/<int:backup_id>/copy/", views_offsite.backup_copy, name="backup_copy"),
    path("copies/", views_offsite.copy_list, name="copy_list"),
    path("copies/<int:copy_id>/", views_offsite.copy_detail, name="copy_detail"),
    path("copies/<int:copy_id>/progress/", views_offsite.copy_progress, name="copy_progress"),
    path("copies/<int:copy_id>/cancel/", views_offsite.copy_cancel, name="copy_cancel"),
    path("restores/", views.restore_list, name="restore_list"),
    path("restores/<int:restore_id>/", views.restore_detail, name="restore_detail"),
    path("restores/<int:restore_id>/cancel/", views.restore_cancel, name="restore_cancel"),
    path("restores/<int:restore_id>/progress/", views.restore_progress, name="restore_progress"),
    path("policies/", views.policy_list, name="policy_list"),
    path("policies/new/", views.policy_create, name="policy_create"),
    path("policies/<int:policy_id>/", views.policy_edit, name="policy_edit"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
