"""Keep each policy's schedule in step with the policy, however it was saved."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from . import alerts, schedules, waiting
from .models import BackupPolicy, Host


@receiver(post_save, sender=BackupPolicy)
def policy_saved(sender, instance, **kwargs):
    schedules.sync_policy(instance)


@receiver(post_delete, sender=BackupPolicy)
def policy_deleted(sender, instance, **kwargs):
    schedules.remove_policy(instance)


@receiver(post_save, sender=Host)
def host_saved(sender, instance, created=False, raw=False, update_fields=None, **kwargs):
    """A host's cluster decides where its reconcile and verify pass run. Saves that cannot
    change it (the inventory sync's, every 15 minutes) leave the schedules alone."""
    if raw or (update_fields is not None and "cluster" not in update_fields):
        return
    schedules.install_housekeeping()


@receiver(post_delete, sender=Host)
def host_deleted(sender, instance, **kwargs):
    schedules.install_housekeeping()


@receiver(waiting.run_waiting)
def run_waiting(sender, run, host, since, **kwargs):
    """``waiting`` found a run no worker takes: mail it once (``alerts``)."""
    alerts.run_waiting(run, host, since)
