"""Run identity (no cluster): which edits start a new run, and that an operator upgrade (a new
defaulted field, a changed default) moves nothing."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from kubetune.api.spec import TrainingSpec
from kubetune.controller import runs
from tests.trainer.jobs import EXAMPLES, merged

Obj = dict[str, Any]


def spec(changes: Obj | None = None) -> Obj:
    manifest = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    out: Obj = merged(manifest, {"spec": changes or {}})["spec"]
    return out


def started(body: Obj, generation: int = 1, token: str | None = None) -> Obj:
    """The previous status right after the run of `body` started."""
    choice = runs.choose("qs", body, generation, token, {})
    run: Obj = {"id": choice.id, "spec": choice.spec}
    if token:
        run["retrainToken"] = token
    return {"observedGeneration": generation, "currentRun": run}


def test_run_id_is_deterministic_and_follows_training_fields_only() -> None:
    first = runs.run_id("qs", spec())
    assert first == runs.run_id("qs", spec())
    assert re.fullmatch(r"qs-[0-9a-f]{8}", first)
    assert runs.run_id("qs", spec({"training": {"learningRate": 5e-4}})) != first
    for change in (
        {"runPolicy": {"ttlSecondsAfterFinished": 60, "backoffLimit": 7}},
        {"resources": {"priorityClassName": "high", "nodeSelector": {"pool": "a100"}}},
        {"image": {"pullPolicy": "Always"}},
        {"evaluation": {"samplePrompts": ["Hello?"]}},
        {"output": {"maxShardSize": "5GB", "merge": False}},
    ):
        assert runs.run_id("qs", spec(change)) == first, change
    assert runs.run_id("qs", spec(), "2024-06-01") not in (first, None)


@pytest.mark.parametrize(
    ("change", "new_run"),
    [
        ({"training": {"learningRate": 5e-4}}, True),
        ({"data": {"maxLength": 256}}, True),
        ({"output": {"subPath": "elsewhere"}}, True),
        ({"evaluation": {"samplePrompts": ["Hello?"]}}, False),
        ({"output": {"maxShardSize": "5GB"}}, False),
        ({"runPolicy": {"backoffLimit": 9}}, False),
        ({"resources": {"priorityClassName": "high"}}, False),
    ],
)
def test_an_edit_starts_a_new_run_only_for_training_fields(change: Obj, new_run: bool) -> None:
    previous = started(spec())
    choice = runs.choose("qs", spec(change), 2, None, previous)
    assert choice.new is new_run
    if not new_run:
        # The run keeps what it was started with; the edit waits for the next run.
        assert choice.spec == previous["currentRun"]["spec"]
        assert choice.id == previous["currentRun"]["id"]


def test_an_upgrade_that_adds_a_defaulted_field_moves_nothing() -> None:
    previous = started(spec())
    # The new CRD's default appears in the stored object without an edit...
    upgraded = spec({"training": {"newKnob": 7}})
    assert runs.choose("qs", upgraded, 1, None, previous).id == previous["currentRun"]["id"]
    assert not runs.choose("qs", upgraded, 1, None, previous).new


def test_an_upgrade_that_changes_a_default_and_a_later_unrelated_edit_move_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    previous = started(spec())
    # A release with another default for a field the user never set...
    field = TrainingSpec.model_fields["warmup_ratio"]
    monkeypatch.setattr(field, "default", 0.5)
    TrainingSpec.model_rebuild(force=True)
    try:
        # ...then the user edits only the TTL (generation 2): still the same run.
        edited = spec({"runPolicy": {"ttlSecondsAfterFinished": 60}})
        choice = runs.choose("qs", edited, 2, None, previous)
        assert not choice.new and choice.id == previous["currentRun"]["id"]
    finally:
        monkeypatch.undo()
        TrainingSpec.model_rebuild(force=True)


def test_without_an_edit_the_record_is_not_even_compared() -> None:
    previous = started(spec())
    changed = spec({"training": {"learningRate": 5e-4}})
    # Same generation as observed: whatever the stored spec reads like now, same run.
    assert not runs.choose("qs", changed, 1, None, previous).new


def test_retrain_token_starts_a_new_run_and_retrain_off_keeps_the_record() -> None:
    previous = started(spec())
    assert runs.choose("qs", spec(), 1, "t1", previous).new
    off = spec({"runPolicy": {"retrainOnSpecChange": False}, "training": {"learningRate": 5e-4}})
    choice = runs.choose("qs", off, 2, None, previous)
    assert not choice.new and choice.spec == previous["currentRun"]["spec"]
    # Retries render from the record plus the live runPolicy/resources/image.
    effective = runs.effective_spec(choice, off)
    assert effective["training"] == previous["currentRun"]["spec"]["training"]
    assert effective["runPolicy"] == off["runPolicy"]


def test_a_status_without_a_record_is_adopted_as_it_is() -> None:
    legacy = {"observedGeneration": 3, "currentRun": {"id": "qs-0000abcd"}}
    choice = runs.choose("qs", spec({"training": {"learningRate": 5e-4}}), 4, None, legacy)
    assert choice.id == "qs-0000abcd" and not choice.new


def test_a_revert_returns_to_the_earlier_run_id() -> None:
    a, b = spec(), spec({"training": {"learningRate": 5e-4}})
    on_a = started(a)
    to_b = runs.choose("qs", b, 2, None, on_a)
    assert to_b.new
    on_b = {"observedGeneration": 2, "currentRun": {"id": to_b.id, "spec": to_b.spec}}
    back = runs.choose("qs", a, 3, None, on_b)
    assert back.new and back.id == on_a["currentRun"]["id"]


def test_an_empty_retrain_token_is_no_token() -> None:
    previous = started(spec())
    upgraded = spec({"training": {"newKnob": 7}})  # the stored spec changed without an edit
    choice = runs.choose("qs", upgraded, 1, "", previous)
    assert not choice.new and choice.spec == previous["currentRun"]["spec"]


def test_defaults_are_compared_filled_in_also_after_a_default_changed() -> None:
    """The record lacks a field the live spec now carries at its default value (written out
    by a client, or by a new CRD default): the same training, so the same run."""
    from tests.controller.upgraded_operator import restore, upgrade

    previous = started(spec())
    explicit = spec({"training": {"weightDecay": 0.0}, "runPolicy": {"backoffLimit": 5}})
    assert runs.training_fields(explicit) != runs.training_fields(spec())  # raw: different
    assert not runs.choose("qs", explicit, 2, None, previous).new
    upgrade()  # a release whose default weightDecay is 0.1, with a new defaulted field
    try:
        written_out = spec({"training": {"weightDecay": 0.1, "upgradeKnob": 7}})
        assert not runs.choose("qs", written_out, 2, None, previous).new
        # A real training change is still one.
        assert runs.choose("qs", spec({"training": {"weightDecay": 0.3}}), 2, None, previous).new
    finally:
        restore()
