"""The training recipe: one FineTuneJob, start to finish, readable top to bottom.

The same function runs on a laptop (`kubetune train job.yaml`) and in every training pod
(torchrun sets RANK/WORLD_SIZE; rank 0 serves metrics and exports). The loop itself is
transformers' Trainer, given kubetune's own data, model and settings: it brings DeepSpeed,
exact resumption (optimizer, scheduler, RNG and data position) and evaluation.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob
from kubetune.api.spec import FineTuneJobSpec
from kubetune.trainer import export, model_source
from kubetune.trainer.batches import Collator, SequenceDataset
from kubetune.trainer.callbacks import CompleteCheckpoints, Preemption, SampleAnswers, Telemetry
from kubetune.trainer.data import pipeline
from kubetune.trainer.distributed import Topology, deepspeed_config
from kubetune.trainer.generate import answer
from kubetune.trainer.hardware import Hardware, Precision, choose_precision
from kubetune.trainer.layout import RunLayout, run_id_for
from kubetune.trainer.model import apply_method, choose_pad, load_base, transformers_dir
from kubetune.trainer.telemetry import Metrics, Summary, peak_flops

log = logging.getLogger("kubetune.trainer")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM after saving a checkpoint
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


@dataclass(frozen=True)
class RunOptions:
    output_root: Path
    run_id: str | None = None
    metrics_port: int | None = None
    termination_log: Path | None = None


class Preempted(Exception):
    """Training stopped on SIGTERM after a complete checkpoint."""


def training_arguments(
    spec: FineTuneJobSpec, layout: RunLayout, precision: Precision, hardware: Hardware
) -> Any:
    from transformers import TrainingArguments

    training, evaluation = spec.training, spec.evaluation
    warmup: float | int = training.warmup_steps or training.warmup_ratio or 0
    schedule: str = training.scheduler
    if schedule == "constant":
        schedule = "constant_with_warmup" if warmup else "constant"
    has_eval = spec.data.validation_split > 0
    every = evaluation.every_steps or evaluation.every_fraction
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size_per_device,
        per_device_eval_batch_size=training.batch_size_per_device,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm or 0.0,
        optim=OPTIMIZERS[training.optimizer],
        seed=training.seed,
        data_seed=training.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=hardware.device == "cpu",
        logging_steps=training.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if training.save_steps else "epoch",
        save_steps=training.save_steps or 500,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if has_eval and every else ("epoch" if has_eval else "no"),
        eval_steps=every,
        deepspeed=deepspeed_config(spec.distributed.deepspeed, precision),
        remove_unused_columns=False,
        dataloader_num_workers=0,  # data is tokenized up front; the collator counts tokens
        ddp_find_unused_parameters=False,
        report_to=[],
        disable_tqdm=True,
    )


def flops_per_token(model: Any, spec: FineTuneJobSpec, sequence: int) -> float:
    """6N for full fine-tuning, 4N with a frozen base, plus attention (no recompute)."""
    config = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    dense = (6 if spec.method.type == "full" else 4) * params
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return float(dense + 12 * layers * hidden * sequence)


def train(job: FineTuneJob, options: RunOptions) -> Summary:
    """Train `job` and export it; returns the summary (also written beside the outputs)."""
    spec = job.spec
    base_dir = job.source.parent if job.source else Path.cwd()
    topology, hardware = Topology.from_env(), Hardware.detect()
    precision = choose_precision(spec.training.precision, hardware)
    run_id = options.run_id or run_id_for(job.name, spec.to_wire())
    layout = RunLayout(options.output_root, run_id)
    layout.check_not_finished()
    summary = Summary(run_id)
    metrics = Metrics()
    if topology.is_main and options.metrics_port:
        metrics.serve(options.metrics_port)
    metrics.info.info({"run_id": run_id, "method": spec.method.type, "precision": precision})

    # Data and model.
    from transformers import PrinterCallback, Trainer, set_seed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    set_seed(spec.training.seed)
    model_path = model_source.resolve(spec.model, base_dir)
    tokenizer = model_source.load_tokenizer(model_path, spec.model.trust_remote_code)
    prepared = pipeline.prepare(spec.data, tokenizer, base_dir, spec.training.seed)
    assert prepared.template is not None or spec.method.type == "full"
    template = prepared.template
    collator = Collator(choose_pad(tokenizer, template.stops if template else ()))
    model = load_base(model_path, spec, precision, hardware)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model = apply_method(model, spec.method, spec.training.gradient_checkpointing)
    if prepared.stats.packing_efficiency is not None:
        metrics.packing.set(prepared.stats.packing_efficiency)
    log.info(
        "run %s: %d sequences (%d samples), %s on %s in %s",
        run_id, prepared.stats.sequences, prepared.stats.samples, spec.method.type,
        hardware.device_name, precision,
    )  # fmt: skip

    # Training.
    args = training_arguments(spec, layout, precision, hardware)
    sequence = spec.data.cutoff_length or max(len(s) for s in prepared.train)
    telemetry = Telemetry(
        metrics, collator, flops_per_token(model, spec, sequence), peak_flops(hardware.device_name)
    )
    preemption = Preemption()
    callbacks: list[Any] = [telemetry, CompleteCheckpoints(), preemption]
    if template is not None and spec.evaluation.sample_prompts:
        callbacks.append(
            SampleAnswers(
                lambda m, prompts: answer(
                    m, tokenizer, template, prompts, spec.evaluation.max_new_tokens
                ),
                spec.evaluation.sample_prompts,
                layout.work / "samples.jsonl",
            )
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=SequenceDataset(prepared.train),
        eval_dataset=SequenceDataset(prepared.validation) if prepared.validation else None,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # Telemetry logs each step already
    resume = layout.newest_checkpoint()
    if resume is not None:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    summary.steps, summary.total_steps = trainer.state.global_step, trainer.state.max_steps
    history = trainer.state.log_history  # restored from the checkpoint on resume
    summary.final_loss = _last(history, "loss")
    summary.final_eval_loss = _last(history, "eval_loss")
    if preemption.requested:
        summary.phase, summary.message = "Preempted", "stopped on SIGTERM after a checkpoint"
        raise Preempted(summary.to_json())
    log.info("training done: %s", result.metrics)

    # Export. Saving gathers ZeRO-3 shards, so every rank takes part; only rank 0 writes.
    metrics.set_phase("exporting")
    staging = layout.start_export() if topology.is_main else layout.partial
    trainer.save_model(str(staging / ("merged" if spec.method.type == "full" else "adapter")))
    summary.phase = "Succeeded"
    if topology.is_main:
        # The merge loads plain models on rank 0 alone: ZeRO-3's partitioned loading would
        # wait for ranks that have finished.
        unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
        if spec.output.merge and spec.method.type != "full":
            metrics.set_phase("merging")
        _finish_export(job, layout, staging, model_path, tokenizer, template, summary, history)
        metrics.set_phase("done")
    return summary


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return float(values[-1]) if values else None


def _finish_export(
    job: FineTuneJob,
    layout: RunLayout,
    staging: Path,
    model_path: Path,
    tokenizer: Any,
    template: Any,
    summary: Summary,
    history: list[dict[str, Any]],
) -> None:
    spec = job.spec
    report = None
    if spec.output.merge and spec.method.type != "full":
        base_dir = transformers_dir(model_path)
        dtype = export.merge_dtype(spec.output.dtype, base_dir)
        merged, report = export.merge_adapter(
            base_dir, staging / "adapter", dtype, tokenizer, spec.model.trust_remote_code
        )
        export.save_model(
            merged, tokenizer, template, staging / "merged", spec.output.max_shard_size
        )
        del merged
    elif spec.method.type == "full":
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(staging / "merged")
        export.save_model(
            trained, tokenizer, template, staging / "merged", spec.output.max_shard_size
        )
    golden: list[dict[str, str]] = []
    if (staging / "merged").exists() and spec.evaluation.sample_prompts:
        golden = export.golden_answers(
            staging / "merged",
            template,
            spec.evaluation.sample_prompts,
            spec.evaluation.max_new_tokens,
        )
        (staging / "golden_answers.jsonl").write_text(
            "".join(f"{_json(g)}\n" for g in golden), encoding="utf-8"
        )
    if not spec.output.keep_adapter and (staging / "merged").exists():
        shutil.rmtree(staging / "adapter", ignore_errors=True)
    samples = layout.work / "samples.jsonl"
    if samples.exists():
        shutil.copy(samples, staging / "samples.jsonl")
        _log_before_after(samples, golden)
    metrics = {"final_loss": summary.final_loss, "final_eval_loss": summary.final_eval_loss}
    (staging / "README.md").write_text(export.model_card(job.name, spec, metrics, report, golden))
    (staging / "history.jsonl").write_text("".join(f"{_json(h)}\n" for h in history))
    final = layout.final
    summary.outputs = {
        name: str(final / name) for name in ("adapter", "merged") if (staging / name).exists()
    }
    (staging / "summary.json").write_text(summary.to_json() + "\n")
    layout.publish()


def _log_before_after(samples: Path, golden: list[dict[str, str]]) -> None:
    """What the base said at step 0 next to what the exported model says."""
    records = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    before = {r["prompt"]: r["answer"] for r in records if r["step"] == 0}
    for item in golden:
        prompt = item["prompt"]
        log.info("%r\n  before: %s\n  after:  %s", prompt, before.get(prompt, "-"), item["answer"])


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
