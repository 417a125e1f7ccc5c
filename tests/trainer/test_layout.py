"""RunLayout: only complete checkpoints resume, exports appear whole, finished runs stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.trainer.layout import (
    COMPLETE,
    OutputExistsError,
    RunLayout,
    mark_complete,
    run_id_for,
)


def _checkpoint(layout: RunLayout, step: int, complete: bool) -> Path:
    path = layout.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        mark_complete(path)
    return path


def test_no_checkpoints_means_a_fresh_start(tmp_path: Path) -> None:
    assert RunLayout(tmp_path, "run-1").newest_checkpoint() is None


def test_newest_complete_checkpoint_is_chosen_and_incomplete_ones_never(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    _checkpoint(layout, 5, complete=True)
    newest_complete = _checkpoint(layout, 10, complete=True)
    _checkpoint(layout, 15, complete=False)  # the pod died while writing it
    (layout.checkpoints / "checkpoint-99.tmp").mkdir()  # not a checkpoint name at all
    (layout.checkpoints / "checkpoint-99.tmp" / COMPLETE).write_text("")
    assert layout.newest_checkpoint() == newest_complete


def test_steps_compare_as_numbers_not_text(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    _checkpoint(layout, 9, complete=True)
    newest = _checkpoint(layout, 10, complete=True)
    assert layout.newest_checkpoint() == newest


def test_only_incomplete_checkpoints_means_a_fresh_start(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    _checkpoint(layout, 3, complete=False)
    assert layout.newest_checkpoint() is None


def test_publish_renames_partial_into_place_and_points_latest_at_it(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    _checkpoint(layout, 1, complete=True)
    staging = layout.start_export()
    (staging / "merged").mkdir()
    (staging / "merged" / "model.safetensors").write_bytes(b"merged")
    assert not layout.final.exists()  # nothing visible under the final name while writing
    inode = staging.stat().st_ino

    final = layout.publish()

    assert final.stat().st_ino == inode  # renamed, not copied file by file
    assert final == tmp_path / "run-1"
    assert (final / "merged" / "model.safetensors").read_bytes() == b"merged"
    assert not layout.partial.exists()
    assert not layout.work.exists()  # checkpoints are dropped once the run is published
    latest = tmp_path / "latest"
    assert latest.is_symlink() and latest.readlink() == Path("run-1")
    assert latest.resolve() == final.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-1"]


def test_latest_moves_to_the_newer_run_and_older_runs_stay(tmp_path: Path) -> None:
    for run_id in ("run-1", "run-2"):
        layout = RunLayout(tmp_path, run_id)
        (layout.start_export() / "marker").write_text(run_id)
        layout.publish()
    assert (tmp_path / "latest").readlink() == Path("run-2")
    assert (tmp_path / "run-1" / "marker").read_text() == "run-1"


def test_latest_is_untouched_when_the_rename_fails(tmp_path: Path) -> None:
    first = RunLayout(tmp_path, "run-1")
    first.start_export()
    first.publish()
    with pytest.raises(FileNotFoundError):
        RunLayout(tmp_path, "run-2").publish()  # no export was staged
    assert (tmp_path / "latest").readlink() == Path("run-1")


def test_start_export_clears_a_previous_attempts_leftovers(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    (layout.start_export() / "half-written.safetensors").write_bytes(b"x")
    assert list(layout.start_export().iterdir()) == []


def test_a_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    (layout.start_export() / "model").write_text("first")
    layout.publish()
    (layout.start_export() / "model").write_text("second")
    with pytest.raises(OutputExistsError, match=r"run-1 already holds a finished run.*--run-id"):
        layout.check_not_finished()
    with pytest.raises(OutputExistsError):
        layout.publish()
    assert (layout.final / "model").read_text() == "first"


def test_run_id_is_deterministic_and_follows_the_spec() -> None:
    spec = {"training": {"epochs": 3, "learningRate": 2e-4}, "model": {"path": "m"}}
    reordered = {"model": {"path": "m"}, "training": {"learningRate": 2e-4, "epochs": 3}}
    changed = {"training": {"epochs": 4, "learningRate": 2e-4}, "model": {"path": "m"}}
    run_id = run_id_for("chat", spec)
    assert run_id == run_id_for("chat", reordered)
    assert run_id.startswith("chat-") and len(run_id) == len("chat-") + 8
    assert run_id_for("chat", changed) != run_id
    assert run_id_for("other", spec) != run_id
