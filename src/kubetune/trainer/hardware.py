"""The device a process trains on and the precision that is fast and correct there.

`auto` means bf16 only where the GPU computes it natively (Ampere and newer), fp16 with loss
scaling on older GPUs, and fp32 on CPU. TRL's SFTConfig defaults to bf16 and gradient
checkpointing; on a CPU without bf16 units that made one SmolLM2 step ~20x slower than fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["bf16", "fp16", "fp32"]
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


class PrecisionError(ValueError):
    """A precision the hardware cannot train in."""


@dataclass(frozen=True)
class Hardware:
    device: Literal["cuda", "cpu"]
    bf16_native: bool
    device_name: str

    @staticmethod
    def detect() -> Hardware:
        if torch.cuda.is_available():
            # Pre-Ampere GPUs run bf16 only by emulation, which torch counts as "supported"
            # unless asked not to; emulated bf16 is far slower than fp16 there.
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return Hardware("cuda", native, torch.cuda.get_device_name())
        return Hardware("cpu", False, "cpu")


def choose_precision(requested: str, hardware: Hardware) -> Precision:
    """The training precision for `requested` (auto, bf16, fp16 or fp32) on `hardware`."""
    if requested not in ("auto", *DTYPES):
        raise PrecisionError(
            f"spec.training.precision: unknown {requested!r}; use auto, bf16, fp16 or fp32"
        )
    if requested == "auto":
        if hardware.device == "cpu":
            return "fp32"
        return "bf16" if hardware.bf16_native else "fp16"
    if requested == "fp16" and hardware.device == "cpu":
        raise PrecisionError(
            "spec.training.precision: fp16 needs a GPU (loss scaling is a CUDA feature); "
            "use auto or fp32 on CPU"
        )
    if requested == "bf16" and hardware.device == "cuda" and not hardware.bf16_native:
        raise PrecisionError(
            f"spec.training.precision: {hardware.device_name} has no native bf16; "
            "use auto (fp16) or fp32"
        )
    return requested  # type: ignore[return-value]
