"""Where a run writes, so that nothing half-written is ever taken for finished.

    <root>/<run-id>/                 the finished run: adapter/, merged/, samples, summary
    <root>/.<run-id>.work/           checkpoints while training (kept across attempts)
    <root>/.<run-id>.partial/        the export being written; renamed to <run-id> when done
    <root>/latest -> <run-id>        updated last, atomically

A checkpoint counts only once its COMPLETE marker exists (written after every file of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

COMPLETE = "COMPLETE"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class OutputExistsError(ValueError):
    """The run's final directory already holds a finished run."""


def run_id_for(name: str, spec_wire: dict[str, object]) -> str:
    """A run id stable for the same training spec, so a restarted local run resumes."""
    digest = hashlib.sha256(json.dumps(spec_wire, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    run_id: str

    @property
    def final(self) -> Path:
        return self.root / self.run_id

    @property
    def work(self) -> Path:
        return self.root / f".{self.run_id}.work"

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    @property
    def partial(self) -> Path:
        return self.root / f".{self.run_id}.partial"

    def check_not_finished(self) -> None:
        if self.final.exists():
            raise OutputExistsError(
                f"{self.final} already holds a finished run; kubetune never overwrites one. "
                "Change the spec (a new run id follows) or pass another --run-id."
            )

    def newest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose COMPLETE marker exists."""
        if not self.checkpoints.exists():
            return None
        complete = [
            (int(match.group(1)), path)
            for path in self.checkpoints.iterdir()
            if (match := CHECKPOINT.match(path.name)) and (path / COMPLETE).exists()
        ]
        return max(complete)[1] if complete else None

    def start_export(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)  # a previous attempt's leftovers
        self.partial.mkdir(parents=True)
        return self.partial

    def publish(self) -> Path:
        """Rename the finished export into place, then point `latest` at it."""
        self.check_not_finished()
        self.partial.rename(self.final)
        pointer = self.root / f".latest.{os.getpid()}"
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(self.run_id)
        pointer.replace(self.root / "latest")
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final


def mark_complete(checkpoint: Path) -> None:
    (checkpoint / COMPLETE).write_text("")
