"""Load the base model for a method and wrap it for training (LoRA, QLoRA or full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune.api.spec import FineTuneJobSpec, MethodSpec
from kubetune.trainer.hardware import DTYPES, Hardware, Precision
from kubetune.trainer.model_source import ModelSourceError, gguf_as_transformers

# Tokens a model may already have that are safe to pad with (never an end-of-turn marker).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def transformers_dir(path: Path) -> Path:
    """A directory transformers can load; GGUF files are converted once."""
    return gguf_as_transformers(path) if path.suffix == ".gguf" else path


def load_base(path: Path, spec: FineTuneJobSpec, precision: Precision, hardware: Hardware) -> Any:
    """The base model in the dtype the method trains it in (4-bit for QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    method = spec.method
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.model.trust_remote_code,
        "attn_implementation": "sdpa",
    }
    # Full fine-tuning keeps fp32 master weights under autocast; adapters train on a base
    # stored in the compute dtype.
    kwargs["dtype"] = torch.float32 if method.type == "full" else DTYPES[precision]
    if method.type == "qlora":
        quant = method.quantization
        assert quant is not None  # the spec's CEL rule guarantees it
        compute = precision if quant.compute_dtype == "auto" else quant.compute_dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute],
        )
        if hardware.device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(transformers_dir(path), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"spec.model: cannot load a model from {path}: {err}") from err
    model.config.use_cache = False  # the KV cache is for generation, not training
    return model


def apply_method(model: Any, method: MethodSpec, gradient_checkpointing: bool) -> Any:
    """Wrap `model` with a LoRA adapter (lora, qlora) or leave every weight trainable (full)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.type == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    lora = method.lora
    targets: list[str] | str = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; it scales by alpha/r
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelSourceError(f"spec.method.lora.targetModules: {err}") from err


def choose_pad(tokenizer: Any, stops: tuple[str, ...]) -> int:
    """A pad token that is never an end-of-turn marker, set on the tokenizer.

    Training itself never confuses them (padding is masked by position), but an exported
    tokenizer whose pad is its eos makes common collators mask the stop token out.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token not in stops:
        return int(tokenizer.pad_token_id)
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate and candidate in vocab and candidate not in stops:
            tokenizer.pad_token = candidate
            return int(tokenizer.pad_token_id)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return int(tokenizer.pad_token_id)
