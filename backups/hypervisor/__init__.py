"""The only package that imports libvirt (its modules, one subject each, re-exported here).

Everything crosses this boundary as plain frozen dataclasses or strings: no libvirt object
leaks out, no connection is opened at import, every libvirt error becomes
``HypervisorError`` raised from its cause. Domain XML is read with ElementTree and written
with ElementTree (escaped), never by formatting strings.
"""

import contextlib
import time  # noqa: F401  (tests pause it as ``hypervisor.time.sleep``)
from collections.abc import Iterator

from ..domain_xml import DiskInfo as DiskInfo  # re-exported: callers see one boundary
from ..domain_xml import DomainInfo as DomainInfo
from ..domain_xml import TpmInfo as TpmInfo
from ..domain_xml import parse_domain_xml as parse_domain_xml
from .backup_jobs import BackupJobs
from .backup_jobs import JobProgress as JobProgress
from .block_jobs import BlockJob as BlockJob
from .block_jobs import BlockJobs
from .connection import Connection
from .connection import HypervisorError as HypervisorError
from .connection import ensure_event_loop as ensure_event_loop
from .domains import Domains
from .events import DomainEvent as DomainEvent
from .events import EventWatch as EventWatch
from .guest import Guest
from .saved_state import SavedState


class Session(Connection, Domains, BackupJobs, BlockJobs, SavedState, Guest):
    """One libvirt connection, used as a context manager; hands out plain data only."""


@contextlib.contextmanager
def session(uri: str) -> Iterator[Session]:
    with Session(uri) as opened:
        yield opened
