from django.urls import path

from . import views

urlpatterns = [
    path("", views.overview, name="overview"),
    path("vms/<int:vm_id>/", views.vm_detail, name="vm_detail"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("backups/<int:backup_id>/", views.backup_detail, name="backup_detail"),
]
