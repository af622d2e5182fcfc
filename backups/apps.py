from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "VM backups"

    def ready(self):
        from . import signals  # noqa: F401  (connects the receivers)
