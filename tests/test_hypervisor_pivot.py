"""The pivot at the end of a blockcommit: libvirt may refuse it for a moment after the job
looks complete (cur == end before QEMU calls it ready). Pure control flow, libvirt faked."""

import libvirt
import pytest

from backups import hypervisor
from backups.hypervisor import BlockJob, HypervisorError, Session


class NotReady(libvirt.libvirtError):
    def __init__(self, code=libvirt.VIR_ERR_BLOCK_COPY_ACTIVE):
        Exception.__init__(self, "block copy still active: not ready for pivot yet")
        self.code = code

    def get_error_code(self):
        return self.code


def session(monkeypatch, refusals: list[Exception]):
    s = Session("test:///default")
    state = {"job": BlockJob("vda", "active-commit", 10, 10)}
    pivots = []

    def abort(uuid, target, *, pivot=False):
        pivots.append(pivot)
        if refusals:
            cause = refusals.pop(0)
            raise HypervisorError(f"end block job: {cause}") from cause
        state["job"] = None

    monkeypatch.setattr(s, "_dom", lambda uuid: None)
    monkeypatch.setattr(s, "block_job", lambda uuid, target: state["job"])
    monkeypatch.setattr(s, "abort_block_job", abort)
    monkeypatch.setattr(hypervisor.time, "sleep", lambda seconds: None)
    return s, pivots


def test_it_retries_a_pivot_libvirt_is_not_ready_for(monkeypatch):
    s, pivots = session(monkeypatch, [NotReady(), NotReady()])
    s.commit_active("u", "vda")
    assert pivots == [True, True, True]


def test_any_other_refusal_is_raised_at_once(monkeypatch):
    s, pivots = session(monkeypatch, [NotReady(code=libvirt.VIR_ERR_OPERATION_INVALID)])
    with pytest.raises(HypervisorError, match="not ready"):
        s.commit_active("u", "vda")
    assert pivots == [True]
