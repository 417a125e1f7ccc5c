"""Greedy answers from a model, rendered with the same chat template it was trained with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kubetune.trainer.data.formats import Conversation
from kubetune.trainer.data.templates import ChatTemplate


def stop_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end an answer: every end-of-turn marker of the template."""
    ids = [tokenizer.convert_tokens_to_ids(stop) for stop in template.stops]
    unknown = tokenizer.unk_token_id
    return [i for i in dict.fromkeys(ids) if i is not None and i != unknown]


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    history: Sequence[dict[str, str]] = (),
) -> list[str]:
    """One greedy answer per prompt (each a fresh single-turn conversation after `history`)."""
    was_training = model.training
    model.eval()
    stops = stop_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers = []
    for prompt in prompts:
        conversation = Conversation([*history, {"role": "user", "content": prompt}])
        text = template.render(conversation, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
        )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return answers
