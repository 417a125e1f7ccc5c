"""Hooks into the transformers training loop: telemetry, complete checkpoints, preemption
and sample generations."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.trainer.batches import Collator
from kubetune.trainer.layout import mark_complete
from kubetune.trainer.telemetry import Metrics

log = logging.getLogger("kubetune.trainer")


class Telemetry(TrainerCallback):
    """Publishes loss, throughput, MFU and ETA on every log (rank 0 only).

    The Trainer collates evaluation batches with the same collator, so the tokens and time
    of each evaluation (between a step's end and `on_evaluate`) are taken out of the training
    throughput.
    """

    def __init__(
        self, metrics: Metrics, collator: Collator, flops_per_token: float, peak: float | None
    ) -> None:
        self.metrics = metrics
        self.collator = collator
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.window_start = time.monotonic()
        self.window_tokens = 0
        self.window_step = 0
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.eval_tokens = 0
        self.step_end_tokens = 0
        self.step_end_time = time.monotonic()

    def _trained_tokens(self) -> int:
        return self.collator.tokens_seen - self.eval_tokens

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.metrics.total_steps.set(state.max_steps)
        self.metrics.set_phase("training")
        self.window_start, self.window_step = time.monotonic(), state.global_step
        self.window_tokens = self._trained_tokens()
        self.first_step = state.global_step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.step_end_tokens, self.step_end_time = self.collator.tokens_seen, time.monotonic()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        now = time.monotonic()
        self.eval_tokens += self.collator.tokens_seen - self.step_end_tokens
        self.window_start += now - self.step_end_time
        self.step_end_tokens, self.step_end_time = self.collator.tokens_seen, now
        self.metrics.set_phase("training")

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.metrics.set_phase("evaluating")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        logs = logs or {}
        now = time.monotonic()
        tokens = self._trained_tokens() - self.window_tokens
        seconds = max(now - self.window_start, 1e-9)
        shown = dict(logs)
        if "loss" in logs:
            self.metrics.loss.set(logs["loss"])
            rate = tokens / seconds
            steps = state.global_step - self.window_step
            self.metrics.tokens.inc(tokens)
            self.metrics.tokens_per_second.set(rate)
            self.metrics.samples_per_second.set(
                steps
                * args.per_device_train_batch_size
                * args.gradient_accumulation_steps
                / seconds
            )
            if self.peak:
                self.metrics.mfu.set(rate * self.flops_per_token / self.peak)
            done = state.global_step - (self.first_step or 0)
            if done > 0:
                eta = (now - self.started) / done * (state.max_steps - state.global_step)
                self.metrics.eta.set(eta)
                shown["eta_s"] = round(eta)
            shown["tokens/s"] = round(rate, 1)
            self.window_start, self.window_tokens = now, self._trained_tokens()
            self.window_step = state.global_step
        if "eval_loss" in logs:
            self.metrics.eval_loss.set(logs["eval_loss"])
        if "learning_rate" in logs:
            self.metrics.learning_rate.set(logs["learning_rate"])
        if "grad_norm" in logs:
            self.metrics.grad_norm.set(logs["grad_norm"])
        self.metrics.step.set(state.global_step)
        self.metrics.epoch.set(state.epoch or 0)
        if torch.cuda.is_available():
            self.metrics.gpu_allocated.set(torch.cuda.memory_allocated())
            self.metrics.gpu_reserved.set(torch.cuda.memory_reserved())
        log.info("step %d/%d %s", state.global_step, state.max_steps, _brief(shown))


def _brief(logs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())


class CompleteCheckpoints(TrainerCallback):
    """Marks a checkpoint complete once every file of it is written (on_save runs after)."""

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            if checkpoint.exists():
                mark_complete(checkpoint)


class Preemption(TrainerCallback):
    """On SIGTERM (eviction, preemption, suspend): checkpoint at the next step end and stop."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class SampleAnswers(TrainerCallback):
    """Answers the spec's sample prompts before training (step 0) and at each evaluation,
    appended to a JSONL file by rank 0.

    Every rank generates: under ZeRO-3 each forward pass gathers weights from all ranks.
    Greedy decoding of the same prompts keeps the ranks in step.
    """

    def __init__(self, generate: Any, prompts: list[str], path: Path) -> None:
        self.generate = generate
        self.prompts = prompts
        self.path = path

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **_: Any,
    ) -> None:
        if state.global_step == 0:  # not when resuming: step 0 is on record already
            self._answer(state, model)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **_: Any,
    ) -> None:
        self._answer(state, model)

    def _answer(self, state: TrainerState, model: Any) -> None:
        if not self.prompts or model is None:
            return
        answers = self.generate(model, self.prompts)
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            for prompt, answer in zip(self.prompts, answers, strict=True):
                record = {"step": state.global_step, "prompt": prompt, "answer": answer}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.info("sample at step %d: %r -> %r", state.global_step, prompt, answer)
