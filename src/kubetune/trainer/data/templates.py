"""Chat templates, and which characters of a rendered conversation carry loss.

Every template, built in or the tokenizer's own, is a Jinja chat template rendered exactly as
transformers renders it. To find the assistant turns, assistant contents are wrapped in
private-use sentinel characters, the conversation is rendered once, and the sentinels are cut
out again, leaving the text and the character spans of every answer. A template that alters
contents beyond trimming (checked once with a probe conversation), or a conversation with
tool calls, falls back to rendering prefixes (`render(messages[:i])`) turn by turn.

A span is then extended over the template's end-of-turn marker, so the model learns to stop:
`<|im_end|>` for ChatML, and for GLM-style templates, which end a turn only where the next
`<|user|>` begins, that next role token (appended after the last answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kubetune.trainer.data.builtin_templates import BUILTIN, BuiltinTemplate
from kubetune.trainer.data.formats import Conversation

OPEN, CLOSE = "\ue000", "\ue001"
# End-of-turn tokens seen across model families, used for templates we do not ship. A marker
# counts only where the template writes it; role markers also where the role is interpolated
# (GLM writes `<|{{ role }}|>`), since the next turn's role token is what ends a GLM answer.
KNOWN_STOPS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
ROLE_STOPS = ("<|user|>", "<|observation|>")
Span = tuple[int, int]


class TemplateRenderError(ValueError):
    """A template that cannot render a conversation."""


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]
    """Character spans that carry loss (answers and their end-of-turn markers)."""
    stop_trained: bool
    """Whether every answer ends in a stop marker that carries loss."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    # The same settings transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()

_PROBE = Conversation(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello there. "},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes\n"},
    ]
)


@dataclass
class ChatTemplate:
    """A Jinja chat template plus the markers that end an assistant turn."""

    name: str
    source: str
    stops: tuple[str, ...]
    """End-of-turn strings; the first is appended after a final answer that lacks one."""
    variables: dict[str, Any] = field(default_factory=dict)
    """bos_token, eos_token and the like, as transformers passes them."""

    @cached_property
    def _compiled(self) -> Any:
        try:
            return _ENV.from_string(self.source)
        except TemplateError as err:
            raise TemplateRenderError(f"template {self.name!r} does not parse: {err}") from err

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        return self._render(conversation.messages, conversation.tools, add_generation_prompt)

    def _render(
        self, messages: Sequence[dict[str, Any]], tools: Any, add_generation_prompt: bool
    ) -> str:
        try:
            rendered: str = self._compiled.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self.variables,
            )
        except TemplateError as err:
            raise TemplateRenderError(f"template {self.name!r}: {err}") from err
        return rendered

    @cached_property
    def _sentinel_mode(self) -> Callable[[str], str] | None:
        """How to wrap contents so that one render finds the answers, if this template allows."""
        plain = self.render(_PROBE)
        for prepare in (lambda c: c, str.strip):
            try:
                text, _ = self._render_with_sentinels(_PROBE, prepare)
            except TemplateRenderError:
                return None
            if text == plain:
                return prepare
        return None

    def _render_with_sentinels(
        self, conversation: Conversation, prepare: Callable[[str], str]
    ) -> tuple[str, list[Span]]:
        wrapped = [
            m | {"content": OPEN + prepare(m["content"]) + CLOSE} if m["role"] == "assistant" else m
            for m in conversation.messages
        ]
        marked = self._render(wrapped, conversation.tools, False)
        pieces = marked.split(OPEN)
        text, spans = pieces[0], []
        for piece in pieces[1:]:
            answer, sep, rest = piece.partition(CLOSE)
            if not sep:
                raise TemplateRenderError(f"template {self.name!r} dropped an answer's end")
            spans.append((len(text), len(text) + len(answer)))
            text += answer + rest
        if CLOSE in text:
            raise TemplateRenderError(f"template {self.name!r} reordered answer text")
        return text, spans

    def _render_by_prefixes(self, conversation: Conversation) -> tuple[str, list[Span]]:
        messages, tools = conversation.messages, conversation.tools
        text = self._render(messages, tools, False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], tools, True)
            through = self._render(messages[: index + 1], tools, False)
            if not (through.startswith(prompt) and text.startswith(through)):
                raise TemplateRenderError(
                    f"template {self.name!r} renders turn {index} differently depending on what "
                    "follows it, so the answer cannot be located"
                )
            spans.append((len(prompt), len(through.rstrip())))
        return text, spans

    def render_for_training(self, conversation: Conversation) -> Rendered:
        """The full text and the spans that carry loss."""
        if not any(m["role"] == "assistant" for m in conversation.messages):
            raise TemplateRenderError("conversation has no assistant turn to learn from")
        prepare = self._sentinel_mode
        has_tool_calls = any(m.get("tool_calls") for m in conversation.messages)
        if prepare is not None and not has_tool_calls:
            text, spans = self._render_with_sentinels(conversation, prepare)
        else:
            text, spans = self._render_by_prefixes(conversation)
        return self._extend_over_stops(text, spans)

    def _extend_over_stops(self, text: str, spans: list[Span]) -> Rendered:
        extended: list[Span] = []
        stop_trained = True
        for start, end in spans:
            if any(text[start:end].rstrip().endswith(stop) for stop in self.stops):
                extended.append((start, end))
                continue
            after = end + (len(text[end:]) - len(text[end:].lstrip()))
            stop = next((s for s in self.stops if text.startswith(s, after)), None)
            if stop is not None:
                extended.append((start, after + len(stop)))
            elif after == len(text) and self.stops:
                text += self.stops[0]
                extended.append((start, len(text)))
            else:
                extended.append((start, end))
                stop_trained = False
        return Rendered(text, extended, stop_trained)


def builtin(name: str) -> ChatTemplate:
    spec: BuiltinTemplate = BUILTIN[name]
    return ChatTemplate(name, spec.jinja, spec.stops, dict(spec.variables))


def from_tokenizer(tokenizer: Any, source: str | None = None, name: str = "auto") -> ChatTemplate:
    """The tokenizer's own template (or `source`), with stops taken from its special tokens."""
    source = source if source is not None else getattr(tokenizer, "chat_template", None)
    if not source:
        raise TemplateRenderError(
            "the tokenizer has no chat template; set data.template to one of "
            + ", ".join(BUILTIN)
            + " or to custom with data.chatTemplate"
        )
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    eos = getattr(tokenizer, "eos_token", None)
    stops = [eos] if eos else []
    written = [s for s in KNOWN_STOPS if s in source] + list(ROLE_STOPS)
    stops += [s for s in written if s in special and s not in stops]
    variables = {
        "bos_token": getattr(tokenizer, "bos_token", None) or "",
        "eos_token": eos or "",
    }
    return ChatTemplate(name, source, tuple(stops), variables)


def resolve(template: str, tokenizer: Any, chat_template: str | None = None) -> ChatTemplate:
    """The template a DataSpec names: `auto`, a built-in name, or `custom`."""
    if template == "auto":
        return from_tokenizer(tokenizer)
    if template == "custom":
        return from_tokenizer(tokenizer, chat_template, name="custom")
    return builtin(template)
