"""State of the inventory, the policies and every backup run, one module per subject.

Models hold state only: no property talks to libvirt or the disk. The inventory is refreshed
by the sync job (``backups.inventory``), runs are advanced by ``backups.jobs``. Everything is
imported here, so ``from backups.models import X`` and Django's app registry see one module.
"""

from .backup import (
    Backup,
    BackupQuerySet,
    PruneLock,
    Restore,
    RestoreMode,
    RestoreQuerySet,
    VerifyStatus,
)
from .drill import Drill, DrillQuerySet, DrillResult
from .inventory import Disk, DiskDevice, Host, VirtualMachine, VirtualMachineQuerySet, VmState
from .job import (
    ACTIVE_STATUSES,
    BackupRun,
    BackupRunQuerySet,
    Consistency,
    Job,
    Kind,
    RunStatus,
    Trigger,
)
from .offsite import CopyTrigger, OffsiteCopy, OffsiteCopyQuerySet
from .operations import Alert, AlertKind, AlertQuerySet, Installation
from .policy import BackupPolicy, Compression, Method, OffsiteRepository

__all__ = [
    "ACTIVE_STATUSES",
    "Host",
    "VmState",
    "VirtualMachineQuerySet",
    "VirtualMachine",
    "DiskDevice",
    "Disk",
    "Method",
    "Compression",
    "OffsiteRepository",
    "BackupPolicy",
    "RunStatus",
    "Trigger",
    "Consistency",
    "Kind",
    "BackupRunQuerySet",
    "Job",
    "BackupRun",
    "VerifyStatus",
    "BackupQuerySet",
    "Backup",
    "RestoreMode",
    "RestoreQuerySet",
    "Restore",
    "PruneLock",
    "DrillResult",
    "DrillQuerySet",
    "Drill",
    "CopyTrigger",
    "OffsiteCopyQuerySet",
    "OffsiteCopy",
    "Installation",
    "AlertKind",
    "AlertQuerySet",
    "Alert",
]
