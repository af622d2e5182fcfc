"""What one reconcile did, shown by ``vmbackup_reconcile`` and kept by its job."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    interrupted: list[int] = field(default_factory=list)
    restores_interrupted: list[int] = field(default_factory=list)
    drills_interrupted: list[int] = field(default_factory=list)
    sandboxes: list[str] = field(default_factory=list)  # drill sandboxes left: destroyed
    copies_interrupted: list[int] = field(default_factory=list)
    copies_requeued: list[int] = field(default_factory=list)  # the new copies' ids
    locks_released: list[str] = field(default_factory=list)  # of dead vmbackup_prune runs
    overlays: list[str] = field(default_factory=list)
    jobs_aborted: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    restores_resumed: list[int] = field(default_factory=list)  # instant: handed to a worker
    adopted: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # folds of a killed prune, finished/undone
    foreign: list[str] = field(default_factory=list)  # another installation's: left alone
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(self.interrupted)} runs interrupted",
            f"{len(self.restores_interrupted)} restores interrupted",
            f"{len(self.drills_interrupted)} drills interrupted",
            f"{len(self.sandboxes)} stray drill sandboxes removed",
            f"{len(self.copies_interrupted)} offsite copies interrupted "
            f"({len(self.copies_requeued)} requeued)",
            f"{len(self.restores_resumed)} instant restores handed to a worker",
            f"{len(self.locks_released)} prune locks released",
            f"{len(self.overlays)} overlays merged",
            f"{len(self.jobs_aborted)} jobs aborted",
            f"{len(self.thawed)} guests thawed",
            f"{len(self.restarted)} guests restarted",
            f"{len(self.partials)} partial dirs removed",
            f"{len(self.folds)} folds repaired",
            f"{len(self.adopted)} backups adopted from disk",
        ]
        if self.foreign:
            parts.append(f"{len(self.foreign)} foreign artifacts left alone")
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors))
        return ", ".join(parts)
