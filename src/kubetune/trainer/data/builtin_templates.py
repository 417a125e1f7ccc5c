"""Chat templates kubetune ships for model families whose tokenizer may lack one (base models,
GGUF conversions, old checkpoints).

Each renders text identical to the family's official template (tests/trainer/data/test_templates.py
checks this against the official strings kept in tests/fixtures/official_templates/), and
names the markers that end an assistant turn, which the official Jinja does not say.
Tool results (role `tool`) map to each family's own role for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BuiltinTemplate:
    jinja: str
    stops: tuple[str, ...]
    """End-of-turn markers; the first is appended after a final answer that has none."""
    special_tokens: tuple[str, ...]
    """Tokens the template writes that must be single special tokens of the tokenizer."""
    variables: dict[str, str] = field(default_factory=dict)


_CHATML_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML = BuiltinTemplate(
    jinja=_CHATML_TURNS,
    stops=("<|im_end|>",),
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

QWEN2 = BuiltinTemplate(
    # Qwen2 adds a default system prompt when the conversation has none.
    jinja=(
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}" + _CHATML_TURNS
    ),
    stops=("<|im_end|>", "<|endoftext|>"),
    special_tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
)

INTERNLM2 = BuiltinTemplate(
    jinja="{{ bos_token }}" + _CHATML_TURNS,
    stops=("<|im_end|>", "</s>"),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    variables={"bos_token": "<s>"},
)

LLAMA3 = BuiltinTemplate(
    jinja=(
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    stops=("<|eot_id|>", "<|end_of_text|>"),
    special_tokens=(
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|end_of_text|>",
    ),
    variables={"bos_token": "<|begin_of_text|>"},
)

# GLM-4 ends an assistant turn where the next <|user|> or <|observation|> begins, and, like the
# official template, leaves out messages with empty content. The official template's tool
# preamble (a fixed Chinese system text) is not reproduced: for tool data use `template: auto`.
GLM4 = BuiltinTemplate(
    jinja=(
        "[gMASK]<sop>"
        "{% for message in messages %}"
        "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
        "{% if message['content'] %}{{ '<|' + role + '|>\\n' + message['content'] }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
    stops=("<|user|>", "<|observation|>", "<|endoftext|>"),
    special_tokens=(
        "[gMASK]",
        "<sop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
        "<|endoftext|>",
    ),
)

CHATGLM3 = BuiltinTemplate(
    jinja=(
        "[gMASK]sop"
        "{% for message in messages %}"
        "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
        "{{ '<|' + role + '|>\\n ' + message['content'] }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
    stops=("<|user|>", "<|observation|>", "</s>"),
    special_tokens=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
)

BUILTIN: dict[str, BuiltinTemplate] = {
    "glm4": GLM4,
    "chatglm3": CHATGLM3,
    "internlm2": INTERNLM2,
    "llama3": LLAMA3,
    "chatml": CHATML,
    "qwen2": QWEN2,
}
