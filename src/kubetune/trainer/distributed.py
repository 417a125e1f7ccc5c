"""Process topology and the DeepSpeed config generated from the spec.

The same entrypoint runs alone, under torchrun on one node, or as one of several nodes
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them). Batch sizes and
accumulation are left to `auto`, which the transformers integration fills in from the
training arguments, so they can never disagree with the spec.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from kubetune.api.spec import DeepSpeedSpec


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> Topology:
        return Topology(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )


def deepspeed_config(spec: DeepSpeedSpec, precision: str) -> dict[str, Any] | None:
    """A DeepSpeed config for ZeRO stage 1-3 (None for plain data parallelism)."""
    if spec.zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": spec.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if spec.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Gather the full weights when saving, so checkpoints and adapters are never
            # empty shards (the classic peft + ZeRO-3 pitfall).
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if spec.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if spec.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if spec.override:
        config = merge(config, spec.override)
    return config


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged over `base`, recursively for nested objects."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
