"""Process topology and the DeepSpeed config generated from the spec.

The same entrypoint runs alone, under torchrun on one node, or as one of several nodes
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun sets them). Batch sizes and
accumulation are left to `auto`, which the transformers integration fills in from the
training arguments, so they can never disagree with the spec.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.spec import DeepSpeedSpec


class TopologyError(ValueError):
    """Environment variables that describe no valid place in the process group."""


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> Topology:
        """Where this process sits: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or, where a
        launcher gives only the node's rank (NODE_RANK, or the Indexed Job's
        JOB_COMPLETION_INDEX) and the processes per node, the rank derived from them.

        A rank outside the world is refused: two processes that both believed they were rank
        0 would both export into the same run directory.
        """
        env = os.environ if env is None else env
        local_rank = _int(env, "LOCAL_RANK", 0)
        per_node = _int(env, "LOCAL_WORLD_SIZE", 1)
        node_rank = _int(
            env, "GROUP_RANK", _int(env, "NODE_RANK", _int(env, "JOB_COMPLETION_INDEX", 0))
        )
        rank = _int(env, "RANK", node_rank * per_node + local_rank)
        world_size = _int(env, "WORLD_SIZE", _int(env, "NNODES", 1) * per_node)
        if not 0 <= rank < world_size:
            raise TopologyError(
                f"process rank {rank} (local rank {local_rank}, node rank {node_rank}) does not "
                f"fit a world of {world_size} processes ({per_node} per node); check RANK, "
                "LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK and NNODES"
            )
        return Topology(rank, local_rank, world_size, node_rank)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TopologyError(f"environment variable {name}={value!r} is not an integer") from None


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
