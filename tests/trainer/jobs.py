"""Build FineTuneJob files for tests from the examples, run `kubetune train` on them, and ask
the models it exports."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

EXAMPLES = Path(__file__).parents[2] / "examples"


def example_manifests() -> list[Path]:
    """The FineTuneJobs in examples/ (not the quickstart's kustomization files)."""
    return sorted(
        p for p in EXAMPLES.glob("*.yaml")
        if (yaml.safe_load(p.read_text()) or {}).get("kind") == "FineTuneJob"
    )  # fmt: skip


KUBETUNE = str(Path(sys.executable).parent / "kubetune")


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` deep-merged in; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def job_file(directory: Path, example: str, changes: dict[str, Any] | None = None) -> Path:
    """The example manifest with `changes` applied, written to `directory`, its dataset paths
    made absolute so it still finds the example's data."""
    manifest = yaml.safe_load((EXAMPLES / example).read_text())
    for source in manifest["spec"]["data"]["datasets"]:
        if "path" in source:
            source["path"] = str((EXAMPLES / source["path"]).resolve())
    manifest = merged(manifest, changes or {})
    path = directory / example
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def train(
    manifest: Path, output: Path, *extra: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """`kubetune train` in a child process, as a pod or a user runs it."""
    return subprocess.run(
        [KUBETUNE, "train", str(manifest), "--output-dir", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ask(model_dir: Path, questions: list[str], max_new_tokens: int = 40) -> list[tuple[str, bool]]:
    """Greedy answers with plain transformers, and whether each stopped on its own."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    answers = []
    for question in questions:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :]
        stopped = len(new) < max_new_tokens and int(new[-1]) in stops
        answers.append((tokenizer.decode(new, skip_special_tokens=True), stopped))
    return answers
