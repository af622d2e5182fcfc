"""Keep each policy's schedule in step with the policy, however it was saved."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from . import schedules
from .models import BackupPolicy


@receiver(post_save, sender=BackupPolicy)
def policy_saved(sender, instance, **kwargs):
    schedules.sync_policy(instance)


@receiver(post_delete, sender=BackupPolicy)
def policy_deleted(sender, instance, **kwargs):
    schedules.remove_policy(instance)
