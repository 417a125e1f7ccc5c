"""Models named on the command line, resolved and prepared exactly as the trainer does it.

A model argument is what `spec.model.path` accepts: a directory, a .gguf file (converted
once), or `pkg:<package>/<file>`. The tokenizer gets the pad token the trainer chose for it
(`choose_pad` is deterministic), so an adapter whose embeddings grew by that token loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the template names: the trainer's modules (torch, jinja2) load when a command runs.
from kubetune.trainer.data.builtin_templates import BUILTIN

if TYPE_CHECKING:
    from kubetune.trainer.data.templates import ChatTemplate

TEMPLATE_HELP = (
    f"chat template: one of {', '.join(BUILTIN)}, or a Jinja file (default: the tokenizer's own)"
)


class ModelArgumentError(ValueError):
    """A model, adapter or template argument that cannot be used; names the argument."""


def resolve_model(value: str, argument: str) -> Path:
    """A local directory or .gguf file for `value`, resolved like spec.model.path."""
    from kubetune.api.spec import ModelSpec
    from kubetune.trainer.model_source import ModelSourceError, resolve

    try:
        return resolve(ModelSpec(path=value), Path.cwd())
    except ModelSourceError as err:
        reason = str(err).removeprefix("spec.model.path: ")
        raise ModelArgumentError(f"{argument} {value}: {reason}") from None


def check_adapter(adapter: Path) -> Path:
    if not (adapter / "adapter_config.json").is_file():
        raise ModelArgumentError(
            f"--adapter {adapter}: no adapter_config.json there; expected a peft adapter "
            "directory such as <run>/adapter"
        )
    return adapter


def recorded_base(adapter: Path) -> str | None:
    """The base model path recorded in the adapter's config, where it exists locally."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    return str(base) if base and Path(base).exists() else None


def tokenizer_and_template(
    model: Path, template: str | None, trust_remote_code: bool
) -> tuple[Any, ChatTemplate]:
    from kubetune.trainer.model import choose_pad
    from kubetune.trainer.model_source import load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code)
    chat_template = _template(tokenizer, template, model)
    choose_pad(tokenizer, chat_template.stops)
    return tokenizer, chat_template


def _template(tokenizer: Any, template: str | None, model: Path) -> ChatTemplate:
    from kubetune.trainer.data.templates import builtin, from_tokenizer

    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelArgumentError(
                f"{model}: the tokenizer has no chat template; pass --template with one of "
                f"{', '.join(BUILTIN)} or a Jinja file"
            )
        return from_tokenizer(tokenizer)
    if template in BUILTIN:
        return builtin(template)
    path = Path(template)
    if not path.is_file():
        raise ModelArgumentError(
            f"--template {template}: neither a built-in template ({', '.join(BUILTIN)}) nor a file"
        )
    return from_tokenizer(tokenizer, path.read_text(encoding="utf-8"), name=path.stem)


def load_model(model: Path, tokenizer: Any, adapter: Path | None, trust_remote_code: bool) -> Any:
    """The model (plus adapter, unmerged) for inference, in the fast precision here."""
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.hardware import DTYPES, Hardware, choose_precision
    from kubetune.trainer.model import transformers_dir

    hardware = Hardware.detect()
    dtype = DTYPES[choose_precision("auto", hardware)]
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        transformers_dir(model), dtype=dtype, trust_remote_code=trust_remote_code
    )
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        loaded.resize_token_embeddings(len(tokenizer))
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter)
    return loaded.to(hardware.device).eval()
