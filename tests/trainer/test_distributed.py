"""Where a process sits in the job, and the DeepSpeed config generated from the spec."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.spec import DeepSpeedSpec
from kubetune.trainer.distributed import Topology, TopologyError, deepspeed_config, merge


def test_alone_without_any_launcher_is_rank_zero_of_one() -> None:
    topology = Topology.from_env({})
    assert topology == Topology(rank=0, local_rank=0, world_size=1, node_rank=0)
    assert topology.is_main


def test_torchrun_variables_of_the_second_node() -> None:
    # What `torchrun --nnodes 2 --nproc-per-node 4 --node-rank 1` sets for its third process.
    env = {
        "RANK": "6",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "job-0.job",
        "MASTER_PORT": "29500",
        "JOB_COMPLETION_INDEX": "1",
    }
    topology = Topology.from_env(env)
    assert topology == Topology(rank=6, local_rank=2, world_size=8, node_rank=1)
    assert not topology.is_main


def test_rank_derived_from_the_node_rank_when_the_launcher_gives_only_that() -> None:
    env = {"NODE_RANK": "2", "NNODES": "3", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert Topology.from_env(env) == Topology(rank=5, local_rank=1, world_size=6, node_rank=2)


def test_indexed_job_completion_index_is_the_node_rank() -> None:
    env = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2"}
    topology = Topology.from_env(env)
    assert (topology.rank, topology.node_rank, topology.world_size) == (1, 1, 2)
    assert not topology.is_main


def test_second_pod_without_a_world_size_is_refused_rather_than_made_main() -> None:
    # Without the check this pod would count itself rank 0 and export over rank 0's output.
    with pytest.raises(TopologyError, match=r"rank 1 .* world of 1 .*WORLD_SIZE"):
        Topology.from_env({"JOB_COMPLETION_INDEX": "1"})


def test_a_non_integer_variable_is_named() -> None:
    with pytest.raises(TopologyError, match=r"WORLD_SIZE='two' is not an integer"):
        Topology.from_env({"WORLD_SIZE": "two"})


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GROUP_RANK", "NODE_RANK", "JOB_COMPLETION_INDEX", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Topology.from_env() == Topology(rank=3, local_rank=1, world_size=4, node_rank=0)


def _spec(**wire: Any) -> DeepSpeedSpec:
    return DeepSpeedSpec.model_validate(wire)


def test_stage_zero_is_plain_data_parallelism() -> None:
    assert deepspeed_config(_spec(zeroStage=0), "bf16") is None


def test_zero2_without_offload() -> None:
    config = deepspeed_config(_spec(zeroStage=2), "bf16")
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert not any(key.startswith("stage3_") for key in zero)
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"]["enabled"] is False
    # Left to the transformers integration, so they always equal the training arguments.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto"


def test_zero2_with_offload_moves_only_the_optimizer() -> None:
    config = deepspeed_config(_spec(zeroStage=2, offload="cpu"), "fp16")
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero  # parameters can be offloaded at stage 3 only
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_zero3_gathers_weights_on_save() -> None:
    config = deepspeed_config(_spec(zeroStage=3), "fp32")
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    # Without it, saved adapters are empty shards under ZeRO-3.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_param" not in zero
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]


def test_zero3_with_offload_moves_optimizer_and_parameters() -> None:
    config = deepspeed_config(_spec(zeroStage=3, offload="cpu"), "bf16")
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


def test_override_is_deep_merged_over_the_generated_config() -> None:
    override = {
        "zero_optimization": {
            "offload_optimizer": {"pin_memory": False},
            "stage3_max_live_parameters": 1_000_000,
        },
        "bf16": {"enabled": False},
        "wall_clock_breakdown": True,
    }
    spec = _spec(zeroStage=3, offload="cpu", override=override)
    config = deepspeed_config(spec, "bf16")
    assert config is not None
    zero = config["zero_optimization"]
    # Overridden leaves change; their siblings stay as generated.
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["stage3_max_live_parameters"] == 1_000_000
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": False}
    assert config["wall_clock_breakdown"] is True
    assert config["gradient_accumulation_steps"] == "auto"
    assert spec.override == override  # the spec's own object is left alone


def test_merge_replaces_non_objects_whole_and_copies() -> None:
    base = {"a": {"b": [1, 2], "c": 1}}
    override = {"a": {"b": [3]}, "d": {"e": 1}}
    merged = merge(base, override)
    assert merged == {"a": {"b": [3], "c": 1}, "d": {"e": 1}}
    merged["d"]["e"] = 2
    merged["a"]["c"] = 2
    assert override["d"] == {"e": 1} and base["a"]["c"] == 1
