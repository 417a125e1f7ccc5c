"""Turn prepared samples into the tensors the model sees.

Packed sequences reach the model as `position_ids` that restart at every sample, with no
attention mask: transformers then builds a block-diagonal causal mask (SDPA and eager) or
varlen flash-attention boundaries from them, so no token attends across samples. Padding at
the end of a batch forms its own block and carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kubetune.trainer.data.encode import IGNORE, Sample
from kubetune.trainer.data.packing import Packed


class SequenceDataset(Dataset[Sample | Packed]):
    def __init__(self, sequences: Sequence[Sample | Packed]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> Sample | Packed:
        return self.sequences[index]


class Collator:
    """Right-pads a batch; packed batches get restarting positions and no attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokens_seen = 0
        """Non-padding tokens collated so far (batches are collated in the training process)."""

    def __call__(self, batch: Sequence[Sample | Packed]) -> dict[str, Any]:
        width = max(len(item) for item in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), width), IGNORE, dtype=np.int64)
        position_ids = np.zeros((len(batch), width), dtype=np.int64)
        attention_mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, item in enumerate(batch):
            length = len(item)
            self.tokens_seen += length
            input_ids[row, :length] = item.input_ids
            labels[row, :length] = item.labels
            attention_mask[row, :length] = 1
            if isinstance(item, Packed):
                position_ids[row, :length] = item.position_ids
            else:
                position_ids[row, :length] = np.arange(length)
            position_ids[row, length:] = np.arange(width - length)  # padding: its own block
        tensors = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        if not any(isinstance(item, Packed) for item in batch):
            tensors["attention_mask"] = torch.from_numpy(attention_mask)
        return tensors
