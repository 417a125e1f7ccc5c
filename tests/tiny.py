"""Small real tokenizers for model families whose tokenizers cannot be downloaded here.

Each is a byte-level BPE trained in a second on a tiny corpus, with the family's special
tokens registered as single special tokens, as in the real tokenizers. Ids differ from the
real ones; what matters for the tests is that special tokens stay whole and that offsets map
back to the rendered text.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kubetune.trainer.data.builtin_templates import BUILTIN

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, how can I help you today?",
    "You are a helpful assistant. What is 2+2? The answer is 4. 你好，我是助手。",
    "Who are you? I am an AI assistant created to help. Tell me about yourself.",
] * 20

FAMILY_TOKENS = {
    "glm4": {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "chatglm3": {"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"},
    "internlm2": {"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"},
    "llama3": {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"},
    "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
}


@cache
def family_tokenizer(family: str, with_template: bool = False) -> Any:
    """A fast tokenizer with `family`'s special tokens (and optionally its built-in template)."""
    roles = FAMILY_TOKENS[family]
    special = list(dict.fromkeys([*BUILTIN[family].special_tokens, *roles.values()]))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if with_template:
        tokenizer.chat_template = BUILTIN[family].jinja
    return tokenizer


# Config classes of real architectures that transformers implements natively (no remote code).
# "glm" is GLM-4-9B-chat-hf's architecture (and ChatGLM's design); "glm4" is GLM-4-0414's.
ARCHITECTURES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "glm": "GlmConfig",
    "glm4": "Glm4Config",
}


def tiny_causal_lm(
    path: Path, family: str = "chatml", architecture: str = "llama", seed: int = 0
) -> Path:
    """A random-weight causal LM of a real architecture, saved with `family`'s tokenizer.

    Small enough (hidden size 64, 2 layers) that a forward pass takes milliseconds, yet it is
    the real model code, so merge, generation and packing behave as on a full-size model.
    """
    import torch
    import transformers

    tokenizer = family_tokenizer(family, with_template=True)
    config_class = getattr(transformers, ARCHITECTURES[architecture])
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_lora_adapter(base: Path, path: Path, seed: int = 1) -> Path:
    """A LoRA adapter (all linear layers) for the model in `base`, saved by peft.

    peft starts lora_B at zero, which makes an adapter a no-op; random lora_B weights make
    merging and generation differ measurably from the base.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.05)
    adapted.save_pretrained(path)
    return path
