"""The collator: padding carries no loss, packed samples never see each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kubetune.trainer.batches import Collator, SequenceDataset
from kubetune.trainer.data.encode import IGNORE, Sample
from kubetune.trainer.data.packing import pack
from tests.tiny import tiny_causal_lm

PAD = 0


def _sample(ids: list[int], trained_from: int = 0) -> Sample:
    input_ids = np.array(ids, dtype=np.int32)
    labels = input_ids.copy()
    labels[:trained_from] = IGNORE
    return Sample(input_ids, labels)


def test_unpacked_batch_is_right_padded_with_masked_padding() -> None:
    collator = Collator(PAD)
    batch = collator([_sample([5, 6, 7], trained_from=1), _sample([8, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_pad_to_multiple_of_rounds_the_width_up() -> None:
    batch = Collator(PAD, pad_to_multiple_of=8)([_sample([1] * 9), _sample([2] * 3)])
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["labels"][0, 9:] == IGNORE).all() and (batch["labels"][1, 3:] == IGNORE).all()
    assert batch["attention_mask"].sum().item() == 12


def test_packed_batch_restarts_positions_per_sample_and_has_no_attention_mask() -> None:
    packed = pack([_sample([1, 2, 3]), _sample([4, 5]), _sample([6, 7, 8, 9])], capacity=6)
    rows = sorted(packed, key=lambda p: p.lengths)
    assert [p.lengths for p in rows] == [(3,), (4, 2)]
    batch = Collator(PAD)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD, PAD, PAD], [6, 7, 8, 9, 4, 5]]
    # Padding forms a block of its own, so it never joins the last sample's attention.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    # The first token of each packed sample is not predicted from its neighbour; padding
    # carries no loss.
    assert batch["labels"].tolist() == [
        [IGNORE, 2, 3, IGNORE, IGNORE, IGNORE],
        [IGNORE, 7, 8, 9, IGNORE, 5],
    ]


def test_tokens_seen_counts_only_real_tokens() -> None:
    collator = Collator(PAD, pad_to_multiple_of=16)
    collator([_sample([1, 2, 3]), _sample([4])])
    collator(pack([_sample([1, 2]), _sample([3, 4, 5])], capacity=8))
    assert collator.tokens_seen == 4 + 5


def test_dataset_serves_the_sequences_in_order() -> None:
    sequences = [_sample([1]), _sample([2, 3])]
    dataset = SequenceDataset(sequences)
    assert len(dataset) == 2 and dataset[1] is sequences[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_samples_compute_what_they_compute_alone(
    tiny_model_dir: Path, attention: str
) -> None:
    """The claim that matters: a real model given a packed batch gives each sample the same
    logits as when it is run on its own, so no token attended across a sample boundary."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    model.eval()
    rng = np.random.default_rng(0)
    samples = [_sample(rng.integers(10, 370, n).tolist()) for n in (7, 5, 9)]
    rows = [*pack(samples[:2], capacity=12), *pack(samples[2:], capacity=12)]
    assert [row.lengths for row in rows] == [(7, 5), (9,)]  # longest first, as compared below
    batch = Collator(PAD)(rows)
    with torch.no_grad():
        # As in training (load_base turns the cache off): transformers derives the
        # block-diagonal mask from position_ids only when no KV cache is in use.
        packed_logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits

        def alone(sample: Sample) -> torch.Tensor:
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None]
            return model(input_ids=ids).logits[0]

        torch.testing.assert_close(packed_logits[0, :7], alone(samples[0]))
        torch.testing.assert_close(packed_logits[0, 7:12], alone(samples[1]))
        torch.testing.assert_close(packed_logits[1, :9], alone(samples[2]))
