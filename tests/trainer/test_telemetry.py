"""Metrics scraped over real HTTP, and the summary left as the pod's termination message."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kubetune.trainer.telemetry import (
    PHASES,
    TERMINATION_LIMIT,
    Metrics,
    Summary,
    peak_flops,
    write_termination_message,
)

UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_per_second")


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    served = Metrics()
    yield served
    served.close()


def _scrape(port: int) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    return next(s.value for s in samples[name] if all(s.labels[k] == v for k, v in labels.items()))


def test_metrics_are_served_over_http_with_conventional_names(metrics: Metrics) -> None:
    port = metrics.serve(0, "127.0.0.1")
    metrics.loss.set(1.25)
    metrics.tokens.inc(4096)
    metrics.eta.set(90)
    metrics.gpu_allocated.set(2**30)
    metrics.set_phase("training")
    metrics.info.info({"run_id": "chat-0123abcd", "method": "lora", "precision": "fp32"})

    samples = _scrape(port)

    assert all(name.startswith("kubetune_trainer_") for name in samples)
    assert _value(samples, "kubetune_trainer_loss") == 1.25
    assert _value(samples, "kubetune_trainer_tokens_total") == 4096  # a counter ends in _total
    assert _value(samples, "kubetune_trainer_eta_seconds") == 90
    assert _value(samples, "kubetune_trainer_gpu_memory_allocated_bytes") == 2**30
    assert _value(samples, "kubetune_trainer_phase", phase="training") == 1
    assert {s.labels["phase"] for s in samples["kubetune_trainer_phase"]} == set(PHASES)
    assert sum(s.value for s in samples["kubetune_trainer_phase"]) == 1
    info = samples["kubetune_trainer_run_info"][0]
    assert info.labels == {"run_id": "chat-0123abcd", "method": "lora", "precision": "fp32"}
    for name in ("model_flops_utilization_ratio", "packing_efficiency_ratio", "tokens_per_second"):
        assert f"kubetune_trainer_{name}" in samples


def test_metric_names_carry_units_and_no_unbounded_labels(metrics: Metrics) -> None:
    port = metrics.serve(0, "127.0.0.1")
    metrics.info.info({"run_id": "chat-0123abcd"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    # Dimensionless gauges need no unit; everything measured in a unit names it.
    unitless = {"loss", "eval_loss", "learning_rate", "grad_norm", "step", "total_steps"}
    unitless |= {"epoch", "phase", "run_info"}
    counters = {f.name for f in families if f.type == "counter"}
    for family in families:
        short = family.name.removeprefix("kubetune_trainer_")
        if family.name.removesuffix("_created") in counters:
            continue  # the client library's creation timestamp of a counter
        if family.type == "counter":
            assert f"{family.name}_total" in {s.name for s in family.samples}
        elif family.type == "gauge":
            assert short in unitless or short.endswith(UNIT_SUFFIXES), family.name
        assert "milli" not in short and "_ms" not in short and "percent" not in short
    labelled = {f.name for f in families if any(s.labels for s in f.samples)}
    assert labelled == {"kubetune_trainer_phase", "kubetune_trainer_run_info"}


def test_two_runs_in_one_process_keep_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.loss.set(1.0)
    second.loss.set(2.0)
    assert first.registry.get_sample_value("kubetune_trainer_loss") == 1.0


def test_peak_flops_known_only_for_listed_devices() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


def test_summary_is_written_to_the_termination_log_and_beside_the_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = Summary("chat-0123abcd", phase="Succeeded", steps=30, total_steps=30)
    summary.final_loss = 1.5
    summary.outputs = {"merged": "/outputs/chat-0123abcd/merged"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log_path = tmp_path / "termination-log"

    summary.write(log_path, run_dir)

    written = json.loads(log_path.read_text())
    assert written["runId"] == "chat-0123abcd" and written["phase"] == "Succeeded"
    assert (written["steps"], written["totalSteps"], written["finalLoss"]) == (30, 30, 1.5)
    assert written["outputs"] == {"merged": "/outputs/chat-0123abcd/merged"}
    assert "finalEvalLoss" not in written and "message" not in written  # unset: left out
    assert json.loads((run_dir / "summary.json").read_text())["runId"] == "chat-0123abcd"
    assert "kubetune summary: {" in capsys.readouterr().out


def test_a_long_message_is_cut_from_the_front_to_fit_as_valid_json(tmp_path: Path) -> None:
    # Multi-byte text: a byte-level cut would split a character and the JSON both.
    message = "数据错误 " * 1000 + "Traceback end: the real error"
    summary = Summary("chat-0123abcd", phase="Failed", message=message)
    summary.outputs = {f"output-{i}": "/outputs/" + "x" * 100 for i in range(5)}
    log_path = tmp_path / "termination-log"

    summary.write(log_path)

    raw = log_path.read_bytes()
    assert len(raw) <= TERMINATION_LIMIT
    written = json.loads(raw.decode("utf-8"))
    assert written["phase"] == "Failed"
    assert written["message"].startswith("…")
    assert written["message"].endswith("Traceback end: the real error")
    assert len(written["outputs"]) == 5


def test_summary_with_everything_oversized_still_fits(tmp_path: Path) -> None:
    summary = Summary("run", phase="Failed", message="m" * 10)
    summary.outputs = {f"o{i}": "/" + "p" * 1000 for i in range(10)}
    text = summary.to_json(TERMINATION_LIMIT)
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert json.loads(text)["phase"] == "Failed"


def test_an_unwritable_termination_log_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-directory").write_text("")
    unwritable = tmp_path / "not-a-directory" / "termination-log"
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        Summary("run", phase="Succeeded").write(unwritable)
        write_termination_message(tmp_path, "{}")  # a directory
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("cannot write the termination message" in w for w in warnings)
    assert str(unwritable) in warnings[0]
