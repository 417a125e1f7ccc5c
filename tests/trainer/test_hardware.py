"""Precision follows the hardware: bf16 only where it is native, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from kubetune.trainer.hardware import Hardware, PrecisionError, choose_precision

CPU = Hardware("cpu", bf16_native=False, device_name="cpu")
H100 = Hardware("cuda", bf16_native=True, device_name="NVIDIA H100 80GB HBM3")
T4 = Hardware("cuda", bf16_native=False, device_name="Tesla T4")


@pytest.mark.parametrize(("hardware", "expected"), [(CPU, "fp32"), (H100, "bf16"), (T4, "fp16")])
def test_auto_picks_the_fast_precision(hardware: Hardware, expected: str) -> None:
    assert choose_precision("auto", hardware) == expected


@pytest.mark.parametrize(
    ("requested", "hardware"),
    [("fp32", CPU), ("fp32", H100), ("fp32", T4), ("bf16", H100), ("fp16", H100), ("fp16", T4)],
)
def test_explicit_choices_that_work_are_honoured(requested: str, hardware: Hardware) -> None:
    assert choose_precision(requested, hardware) == requested


def test_bf16_on_cpu_is_honoured_when_asked_for() -> None:
    # Slow without bf16 units, but correct (CPU autocast computes it), so the user may ask.
    assert choose_precision("bf16", CPU) == "bf16"


def test_fp16_on_cpu_is_refused_naming_the_field() -> None:
    with pytest.raises(PrecisionError, match=r"spec\.training\.precision: fp16 needs a GPU"):
        choose_precision("fp16", CPU)


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu() -> None:
    with pytest.raises(PrecisionError, match=r"precision: Tesla T4 has no native bf16.*fp16"):
        choose_precision("bf16", T4)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(PrecisionError, match=r"unknown 'int8'; use auto, bf16, fp16 or fp32"):
        choose_precision("int8", H100)


def test_detect_on_this_machine_matches_torch() -> None:
    hardware = Hardware.detect()
    assert hardware.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if hardware.device == "cpu":
        assert hardware == CPU


@pytest.mark.parametrize(("major", "native"), [(7, False), (8, True), (9, True)])
def test_detect_counts_only_native_bf16(
    monkeypatch: pytest.MonkeyPatch, major: int, native: bool
) -> None:
    # A mock GPU (this machine has none): torch reports the device capability, and on
    # pre-Ampere GPUs (major < 8) would call bf16 "supported" through emulation.
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: f"GPU sm_{major}0")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda *_: type("Props", (), {"major": major})()
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *_: True)
    hardware = Hardware.detect()
    assert hardware == Hardware("cuda", native, f"GPU sm_{major}0")
    assert choose_precision("auto", hardware) == ("bf16" if native else "fp16")
