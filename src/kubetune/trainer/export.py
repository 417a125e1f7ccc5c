"""Merge the adapter into the unquantized base, check the merge numerically, and export.

The merged model is saved as sharded safetensors with its tokenizer, the chat template it
was trained with, a generation config that stops at every end-of-turn marker the template
uses, a model card, and the answers the exported model itself (loaded fresh) gives to the
spec's sample prompts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune.api.spec import FineTuneJobSpec
from kubetune.trainer.data.templates import ChatTemplate
from kubetune.trainer.generate import answer, stop_ids
from kubetune.trainer.hardware import DTYPES

log = logging.getLogger("kubetune.trainer")
CHECK_PROMPTS = ("Hello! Who are you?", "Write one sentence about the sea.", "2 + 2 =")
# Largest |logit difference| between base + adapter and the merged model, relative to the
# largest |logit|, accepted per dtype: merging only reorders rounding, it never changes
# what the model computes.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class MergeCheckError(RuntimeError):
    """The merged model does not compute what base + adapter computes."""


@dataclass(frozen=True)
class MergeReport:
    dtype: str
    max_abs_diff: float
    relative_diff: float
    tolerance: float


def merge_dtype(requested: str, base_dir: Path) -> torch.dtype:
    """`auto` keeps the base model's dtype (from its config), fp32 when it names none."""
    if requested != "auto":
        return DTYPES[requested]
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


@torch.no_grad()
def merge_adapter(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype, tokenizer: Any, trust_remote_code: bool
) -> tuple[Any, MergeReport]:
    """Base (never quantized) + adapter, merged, and checked against the unmerged pair."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    batch = tokenizer(list(CHECK_PROMPTS), return_tensors="pt", padding=True)
    unmerged = model(**batch).logits.float()
    merged_model = model.merge_and_unload()
    merged = merged_model(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = float((unmerged - merged).abs()[mask].max())
    scale = float(unmerged.abs()[mask].max())
    report = MergeReport(
        str(dtype).removeprefix("torch."),
        diff,
        diff / max(scale, torch.finfo(torch.float32).tiny),
        RELATIVE_TOLERANCE[dtype],
    )
    # Written so that NaN logits (a broken adapter) fail the check instead of passing it.
    if not report.relative_diff <= report.tolerance:
        raise MergeCheckError(
            f"merged model differs from base + adapter: max |logit diff| {diff:.4g} "
            f"({report.relative_diff:.2e} of the logit scale; {report.dtype} allows "
            f"{report.tolerance:.0e})"
        )
    return merged_model, report


def save_model(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    target: Path,
    max_shard_size: str,
) -> None:
    """Sharded safetensors + tokenizer with its chat template + stopping generation config."""
    stops = stop_ids(tokenizer, template)
    tokenizer.chat_template = template.source
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(target, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(target)


def golden_answers(
    model_dir: Path, template: ChatTemplate, prompts: list[str], max_new_tokens: int
) -> list[dict[str, str]]:
    """The exported model, loaded fresh with plain transformers, answers the sample prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    answers = answer(model, tokenizer, template, prompts, max_new_tokens)
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def model_card(
    name: str,
    spec: FineTuneJobSpec,
    metrics: dict[str, Any],
    report: MergeReport | None,
    golden: list[dict[str, str]],
) -> str:
    sources = [d.path or d.url or d.hf_repo for d in spec.data.datasets]
    lines = [
        f"# {name}",
        "",
        "Fine-tuned with [kubetune](https://github.com/kubetune).",
        "",
        f"- Base model: `{spec.model.path or spec.model.hf_repo or spec.model.url}`",
        f"- Method: {spec.method.type}"
        + (
            f" (r={spec.method.lora.r}, alpha={spec.method.lora.alpha})"
            if spec.method.type != "full"
            else ""
        ),
        f"- Data: {', '.join(f'`{s}`' for s in sources)}; template `{spec.data.template}`",
        f"- Hyper-parameters: `{json.dumps(spec.training.to_wire(), sort_keys=True)}`",
        f"- Final metrics: `{json.dumps(metrics, sort_keys=True)}`",
    ]
    if report is not None:
        lines.append(
            f"- Merge check ({report.dtype}): max |logit diff| between base + adapter and the "
            f"merged model {report.max_abs_diff:.3g} ({report.relative_diff:.2e} of the logit "
            f"scale; tolerance {report.tolerance:.0e})"
        )
    if golden:
        lines += ["", "## Sample answers (from this exported model)", ""]
        lines += [f"- **{g['prompt']}** {g['answer']}" for g in golden]
    return "\n".join(lines) + "\n"
