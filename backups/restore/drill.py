"""Restore drills (DESIGN "Restore": drills): a backup booted in an isolated sandbox until
it proves it is alive, then thrown away. A backup that was never booted is a hope.

1. The chain's structure is checked (every header against its manifest, ``qemu-img check``)
   before QEMU opens it, and its fingerprint taken: stored backups are untrusted input.
   The sandbox's memory must fit ``VMBACKUP_DRILL_MEMORY_MIB`` and the host's free memory.
2. ``<VMBACKUP_DRILL_DIR>/vmbackup-drill-<site>-<id>/`` (search-only, 0711) gets one qcow2
   overlay per disk over the backup's image, as instant recovery makes them; QEMU's user
   is lent read access to the chain by ACL (``instant.lend``), journaled first.
3. The sandbox is a transient domain named like that directory: the restored definition
   (new UUID and MACs, the restore allowlist: no host devices or paths) without network
   interfaces, with graphics that listen nowhere, its first serial port logged into the
   scratch directory (``domain_xml.sandbox_xml``).
4. Proof of life within the timeout, counted from the start: the guest agent answers
   ``guest-ping`` (and the policy's command exits 0 through ``guest-exec``), or, with a
   console pattern, a console line matches it. Time to alive (the RTO) is measured from
   the drill's start, chain check included, as a real recovery would spend it.
5. Evidence (a screenshot where the sandbox has graphics, the console's last lines) goes
   into ``VMBACKUP_DRILL_EVIDENCE_DIR/<id>/`` (root's only) and onto the row.
6. Whatever happened, the sandbox is destroyed, the scratch directory removed, the ACLs
   taken back; the backup's files are compared with the fingerprint: never written.

Reconcile does step 6 for a drill whose worker died (``discard``), from the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid as uuidlib
from pathlib import Path

from django.conf import settings

from .. import domain_xml, hypervisor, notify, private, site, worker
from ..interrupt import Stopped
from ..models import Drill, DrillResult, RunStatus
from ..validators import drill_argv
from . import evidence
from .common import Progress, RestoreCancelled, fingerprint, refuse_while_backing_up, verify_chain
from .instant import give_back, image_chain, lend, overlays
from .rules import RestoreError

log = logging.getLogger(__name__)
CONSOLE = "console.log"
OVERLAY = "{target}.overlay.qcow2"
POLL = 0.5
COMMAND_EVERY = 2.0


class NoSignOfLife(Exception):
    """The verdict: the sandbox ran, but did not prove it was alive in time."""


def execute(drill: Drill) -> str:
    """Run a claimed drill to its end; returns a one-line outcome for django-q2."""
    with worker.Heartbeat(drill.pk, worker.heartbeat_every(), Drill):
        return _execute(drill)


def _execute(drill: Drill) -> str:
    progress = Progress(drill)
    started = time.monotonic()
    try:
        with hypervisor.session(drill.host.uri) as hv:
            try:
                proof = _run(drill, hv, progress)
                alive = round(time.monotonic() - started, 2)
            finally:
                progress.step("cleaned", problems=clean(drill, hv))
    except RestoreCancelled as exc:
        _finish(drill, RunStatus.CANCELLED, str(exc))
        return "cancelled"
    except NoSignOfLife as exc:
        _finish(drill, RunStatus.FAILED, str(exc), result=DrillResult.FAILED)
        return f"failed: {exc}"
    except (Exception, Stopped) as exc:
        if not isinstance(exc, Stopped):
            log.exception("drill %s failed", drill.pk)
        reason = str(exc) or exc.__class__.__name__
        _finish(drill, RunStatus.INTERRUPTED if isinstance(exc, Stopped) else RunStatus.FAILED,
                reason)  # fmt: skip
        if isinstance(exc, Stopped):
            raise
        return f"failed: {reason}"
    _finish(drill, RunStatus.SUCCEEDED, result=DrillResult.PASSED, alive_after_seconds=alive,
            proof=proof)  # fmt: skip
    return f"alive after {alive} s: {proof}"


def _finish(drill: Drill, status: str, error: str = "", **fields) -> None:
    """Record the outcome once (a drill reconcile already ended keeps that outcome), then
    alert on a failure or resolve the VM's drill alert on a pass."""
    step = "done" if status == RunStatus.SUCCEEDED else drill.step
    drill.finish(status, error, only=(RunStatus.RUNNING,), step=step, **fields)
    drill.refresh_from_db()
    notify.drill_finished(drill)


def _run(drill: Drill, hv, progress: Progress) -> str:
    backup_dir = Path(drill.backup.path)
    refuse_while_backing_up(drill.vm)
    if drill.backup.pruned_at:
        raise RestoreError(f"backup {drill.backup_id} was pruned; there is nothing to drill")
    before = fingerprint(backup_dir)
    manifest, _hashes = verify_chain(backup_dir, progress)  # headers first: untrusted input
    original = (backup_dir / "domain.xml").read_text()
    _require_memory(drill, hv, domain_xml.memory_mib(original))
    chains = {disk.target: image_chain(backup_dir, disk) for disk in manifest.disks}
    xml, uuid = _sandbox(drill, progress, backup_dir, manifest, chains, original)
    lend(drill, progress, chains)
    progress.step("start", uuid=uuid, name=drill.name)
    booted = time.monotonic()
    hv.create_transient(xml)
    drill.domain_uuid = uuid
    drill.save(update_fields=["domain_uuid"])
    try:
        return wait_alive(drill, hv, progress, uuid, booted)
    finally:
        with contextlib.suppress(Exception):  # evidence must not hide the verdict
            keep_evidence(drill, hv, uuid, graphics="<graphics" in xml)
        _require_unchanged(backup_dir, before)


def _require_memory(drill: Drill, hv, memory: int) -> None:
    budget = settings.VMBACKUP_DRILL_MEMORY_MIB
    if memory > budget:
        raise RestoreError(
            f"the sandbox would need {memory} MiB of memory, more than the drill budget "
            f"(VMBACKUP_DRILL_MEMORY_MIB={budget}); not drilled"
        )
    free = hv.free_memory_mib()
    if memory > free:
        raise RestoreError(f"{drill.host.name} has {free} MiB free, the sandbox needs {memory}")
    drill.memory_mib = memory
    drill.save(update_fields=["memory_mib"])


def scratch_root() -> Path:
    return Path(os.path.abspath(settings.VMBACKUP_DRILL_DIR))


def _sandbox(drill, progress, backup_dir: Path, manifest, chains, original: str):
    """The scratch directory, the overlays and the sandbox's definition (journaled first)."""
    root = scratch_root()
    if not root.is_dir():
        private.mkdir(root, private.TRAVERSE)  # QEMU passes through to the overlays
    scratch = root / drill.name
    if os.path.lexists(scratch):
        raise RestoreError(f"{scratch} already exists; nothing is overwritten")
    progress.step("scratch", path=str(scratch))
    private.mkdir(scratch, private.TRAVERSE)
    drill.scratch = str(scratch)
    drill.save(update_fields=["scratch"])
    disks, nvram = overlays(manifest, chains, backup_dir, scratch, OVERLAY)
    uuid = str(uuidlib.uuid4())
    xml, notes = domain_xml.restored_xml(
        original, name=drill.name, uuid=uuid, disks=disks, nvram=nvram
    )
    for target, chain in chains.items():
        xml = domain_xml.with_backing_chain(xml, target, chain)
    xml, more = domain_xml.sandbox_xml(
        xml,
        console_log=str(scratch / CONSOLE),
        description=f"vmbackup restore drill {drill.pk} of backup {drill.backup_id}",
    )
    if manifest.tpm:
        tpm = Path(settings.VMBACKUP_SWTPM_DIR) / uuid
        progress.step("tpm", path=str(tpm))
        private.copy_tree(backup_dir / manifest.tpm, tpm)
    progress.step("sandbox", notes=notes + more)
    return xml, uuid


def wait_alive(drill: Drill, hv, progress: Progress, uuid: str, booted: float) -> str:
    """Poll until every check the drill asks for has passed; raise ``NoSignOfLife`` at the
    timeout or when the sandbox stops. Returns what proved it."""
    deadline = booted + drill.timeout_seconds
    pattern = re.compile(drill.console_pattern) if drill.console_pattern else None
    argv = drill_argv(drill.command) if drill.command else []
    agent = bool(argv) or pattern is None
    console = Path(drill.scratch) / CONSOLE
    matched, pinged, ran = None, False, None
    last, next_command = "the guest agent never answered guest-ping", 0.0
    while True:
        progress.check_cancel(every=2.0)
        info = hv.find(uuid)
        if info is None or info.state not in ("running", "paused"):
            state = info.state if info else "gone"
            raise NoSignOfLife(
                f"no sign of life within {drill.timeout_seconds} s: the sandbox is {state} "
                f"after {time.monotonic() - booted:.0f} s"
            )
        if pattern is not None and matched is None:
            matched = next((ln for ln in evidence.console_lines(console) if pattern.search(ln)),
                           None)  # fmt: skip
            last = f"no console line matched {drill.console_pattern!r}"
        if agent and not pinged:
            pinged = hv.agent_responds(uuid, timeout=2)
        if agent and pinged and argv and ran is None and time.monotonic() >= next_command:
            next_command = time.monotonic() + COMMAND_EVERY
            code, detail = _guest_command(hv, uuid, argv, deadline)
            last = f"{drill.command!r} {detail}"
            ran = code if code == 0 else None
        if (pattern is None or matched) and (not agent or pinged) and (not argv or ran == 0):
            break
        if time.monotonic() >= deadline:
            raise NoSignOfLife(f"no sign of life within {drill.timeout_seconds} s: {last}")
        time.sleep(POLL)
    proofs = ["guest-ping"] if agent else []
    proofs += [f"{drill.command} exited 0"] if argv else []
    proofs += [f"console: {matched.strip()[:200]}"] if matched else []
    progress.step("alive", seconds=round(time.monotonic() - booted, 2), proof=proofs)
    return "; ".join(proofs)


def _guest_command(hv, uuid: str, argv: list[str], deadline: float) -> tuple[int | None, str]:
    """Run ``argv`` through guest-exec; (exit code or None, what to say about it)."""
    try:
        started = hv.agent_command(
            uuid, "guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True}
        )
        while time.monotonic() < deadline:
            status = hv.agent_command(uuid, "guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                code = status.get("exitcode", -1)
                err = evidence.b64_text(status.get("err-data", ""))
                return code, f"exited {code}" + (f": {err.strip()[:200]}" if err.strip() else "")
            time.sleep(0.2)
    except (hypervisor.HypervisorError, KeyError, TypeError) as exc:
        return None, f"could not run: {exc}"
    return None, "was still running at the timeout"


def keep_evidence(drill: Drill, hv, uuid: str, *, graphics: bool) -> None:
    """The screen (where the sandbox has graphics) and the console's last lines, into a
    private directory and onto the row (the unprivileged web process shows that copy)."""
    top = Path(settings.VMBACKUP_DRILL_EVIDENCE_DIR)
    top.mkdir(mode=private.DIR, parents=True, exist_ok=True)
    directory = top / str(drill.pk)
    if not directory.is_dir():
        private.mkdir(directory)
    text = evidence.console_tail(Path(drill.scratch) / CONSOLE)
    png = None
    if graphics:
        try:
            png = evidence.as_png(*hv.screenshot(uuid))
        except (hypervisor.HypervisorError, evidence.EvidenceError) as exc:
            text += f"\n(no screenshot: {exc})"
    path = directory / ("screenshot.png" if png else "console.txt")
    if png:
        _replace(path, png)
    _replace(directory / "console.txt", text)
    drill.evidence_path, drill.evidence_text, drill.screenshot = str(path), text, png
    drill.save(update_fields=["evidence_path", "evidence_text", "screenshot"])


def _replace(path: Path, data: bytes | str) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    private.write_file(path, data)


def _require_unchanged(backup_dir: Path, before: dict) -> None:
    if fingerprint(backup_dir) != before:
        raise RestoreError("the backup's files changed during the drill (they must never)")


# -- removing everything: after every drill, and by reconcile for a dead one -------------------


def _steps(drill: Drill) -> dict[str, dict]:
    return {e.get("step"): e for e in drill.journal if isinstance(e, dict)}


def clean(drill: Drill, hv) -> list[str]:
    """Destroy the sandbox, remove the scratch directory and TPM state, take back the ACLs:
    what the journal says was made, and only what is ours. Returns what could not be done."""
    steps, problems = _steps(drill), []
    uuid = steps.get("start", {}).get("uuid", "")
    if uuid and hv.exists(uuid):
        try:
            hv.destroy(uuid)
            if hv.exists(uuid):  # transient: gone once destroyed, unless someone defined it
                hv.undefine(uuid)
        except hypervisor.HypervisorError as exc:
            problems.append(str(exc))
    scratch = Path(steps.get("scratch", {}).get("path", ""))
    if scratch.parent == scratch_root() and scratch.name == drill.name and drill.name:
        if scratch.is_dir() and not scratch.is_symlink():
            shutil.rmtree(scratch, ignore_errors=True)
        if os.path.lexists(scratch):
            problems.append(f"{scratch} could not be removed")
    tpm = Path(steps.get("tpm", {}).get("path", ""))
    if tpm.parent == Path(settings.VMBACKUP_SWTPM_DIR) and tpm.is_dir() and not tpm.is_symlink():
        shutil.rmtree(tpm, ignore_errors=True)
    try:
        give_back(drill)
    except OSError as exc:
        problems.append(f"ACLs not taken back: {exc}")
    return problems


def discard(drill: Drill, hv) -> str:
    """What reconcile does for a drill whose worker died: everything removed; the error."""
    problems = clean(drill, hv)
    drill.log("cleaned", problems=problems, by="reconcile")
    return "interrupted: the worker died; the sandbox and its files are removed" + (
        f" except: {'; '.join(problems)}" if problems else ""
    )


def orphans(hv, me: str) -> list[str]:
    """Sandboxes of this installation on the host with no running drill behind them (a
    drill whose clean-up failed, a worker killed mid-way already repaired): destroyed.
    Another installation's are left alone. Returns the names removed."""
    removed = []
    running = set(Drill.objects.filter(status=RunStatus.RUNNING).values_list("pk", flat=True))
    for domain in hv.domains():
        parsed = site.parse_drill_name(domain.name)
        if parsed is None or parsed[0] != me or parsed[1] in running:
            continue
        with contextlib.suppress(hypervisor.HypervisorError):
            hv.destroy(domain.uuid)
        if hv.exists(domain.uuid):
            hv.undefine(domain.uuid)
        removed.append(domain.name)
    return removed
