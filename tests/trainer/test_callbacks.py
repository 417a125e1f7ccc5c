"""Callbacks inside a real transformers Trainer run on a tiny model (CPU, a few seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune.trainer.batches import Collator, SequenceDataset
from kubetune.trainer.callbacks import CompleteCheckpoints, Telemetry
from kubetune.trainer.data.encode import Sample
from kubetune.trainer.layout import RunLayout
from kubetune.trainer.telemetry import Metrics
from tests.tiny import tiny_causal_lm

TRAIN_LENGTHS = (5, 6, 7, 8)  # two steps of two
EVAL_LENGTHS = (30, 30)


def _samples(lengths: tuple[int, ...], seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for length in lengths:
        ids = rng.integers(10, 300, length).astype(np.int32)
        samples.append(Sample(ids, ids.copy()))
    return samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _train(model_dir: Path, output: Path, callbacks: list[Any], **settings: Any) -> Any:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        num_train_epochs=1,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        **settings,
    )
    collator = next(c.collator for c in callbacks if isinstance(c, Telemetry))
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=SequenceDataset(_samples(TRAIN_LENGTHS, 0)),
        eval_dataset=SequenceDataset(_samples(EVAL_LENGTHS, 1)),
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_tokens_counted_are_the_trained_ones_not_the_evaluated(
    model_dir: Path, tmp_path: Path
) -> None:
    metrics, collator = Metrics(), Collator(pad_token_id=0)
    telemetry = Telemetry(metrics, collator, flops_per_token=1.0, peak=None)

    _train(
        model_dir, tmp_path, [telemetry], eval_strategy="steps", eval_steps=1, save_strategy="no"
    )

    # The collator saw the evaluation batches too (twice: after each step).
    assert collator.tokens_seen == sum(TRAIN_LENGTHS) + 2 * sum(EVAL_LENGTHS)
    registry = metrics.registry
    assert registry.get_sample_value("kubetune_trainer_tokens_total") == sum(TRAIN_LENGTHS)
    assert registry.get_sample_value("kubetune_trainer_step") == 2
    assert registry.get_sample_value("kubetune_trainer_total_steps") == 2
    assert registry.get_sample_value("kubetune_trainer_eval_loss") is not None
    assert registry.get_sample_value("kubetune_trainer_loss") > 0
    assert registry.get_sample_value("kubetune_trainer_phase", {"phase": "training"}) == 1


def test_every_saved_checkpoint_is_marked_complete(model_dir: Path, tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "run-1")
    telemetry = Telemetry(Metrics(), Collator(pad_token_id=0), flops_per_token=1.0, peak=None)

    _train(
        model_dir,
        layout.checkpoints,
        [telemetry, CompleteCheckpoints()],
        save_strategy="steps",
        save_steps=1,
    )

    saved = sorted(p.name for p in layout.checkpoints.glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2"]
    assert all((layout.checkpoints / name / "COMPLETE").exists() for name in saved)
    assert layout.newest_checkpoint() == layout.checkpoints / "checkpoint-2"
