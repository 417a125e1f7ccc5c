"""Find the base model a ModelSpec names and load its tokenizer.

Sources: a local path (relative paths resolve against the manifest's directory), a file
inside an installed Python package (`pkg:<package>/<file>`, how the quickstart ships
SmolLM2 without any download), an HTTP(S) URL (downloaded once into the cache), or a
Hugging Face Hub repository. A GGUF file is converted once into a transformers directory in
the cache, because conversion takes seconds and GGUF-quantized weights cannot be trained.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from kubetune.api.spec import PACKAGE_SCHEME, ModelSpec
from kubetune.trainer.data.sources import cache_dir, download


class ModelSourceError(ValueError):
    """A model that cannot be found or loaded; the message names the spec field."""


def resolve(model: ModelSpec, base_dir: Path) -> Path:
    """A local directory or .gguf file holding the model."""
    if model.path is not None:
        return _local(model.path, base_dir)
    if model.url is not None:
        return _unpacked(download(model.url))
    return _from_hub(str(model.hf_repo), model.revision)


def _local(path: str, base_dir: Path) -> Path:
    if path.startswith(PACKAGE_SCHEME):
        package, _, member = path.removeprefix(PACKAGE_SCHEME).partition("/")
        # find_spec locates the package without importing (and running) it.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"spec.model.path: Python package {package!r} is not installed")
        resolved = Path(next(iter(spec.submodule_search_locations))) / member
    else:
        resolved = Path(path) if Path(path).is_absolute() else base_dir / path
    if not resolved.exists():
        raise ModelSourceError(f"spec.model.path: {path}: no such file or directory")
    return resolved


def _unpacked(archive: Path) -> Path:
    if archive.suffix == ".gguf":
        return archive
    target = archive.with_name(archive.name + ".d")
    if target.exists():
        return target
    partial = archive.with_name(archive.name + ".d.partial")
    shutil.rmtree(partial, ignore_errors=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(partial)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(partial, filter="data")
    else:
        raise ModelSourceError(
            f"spec.model.url: {archive.name} is neither a .gguf file nor a tar or zip archive"
        )
    entries = list(partial.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else partial
    if root != partial:  # archives that wrap everything in one folder
        root.rename(partial.with_name(partial.name + ".root"))
        shutil.rmtree(partial)
        partial.with_name(partial.name + ".root").rename(partial)
    partial.rename(target)
    return target


def _from_hub(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN")
    try:
        return Path(snapshot_download(repo, revision=revision, token=token))
    except Exception as err:  # network, auth and not-found errors all end here
        raise ModelSourceError(f"spec.model.hfRepo: cannot download {repo!r}: {err}") from err


def gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "gguf" / key.hexdigest()[:16]


def _publish(partial: Path, final: Path) -> None:
    """Rename a finished directory into place; a concurrent writer that won is fine too."""
    try:
        partial.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)


def gguf_as_transformers(gguf: Path) -> Path:
    """A transformers directory (safetensors weights, tokenizer) converted once from GGUF.

    GGUF weights are dequantized on load; the result is a plain model that can be trained.
    """
    from transformers import AutoModelForCausalLM

    converted = gguf_cache(gguf) / "model"
    if converted.exists():
        return converted
    partial = converted.with_name(f"model.partial-{os.getpid()}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although
    # the weights are already dequantized: move them into a plain model of the same config.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(partial)
    load_tokenizer(gguf).save_pretrained(partial)
    _publish(partial, converted)
    return converted


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (fast), converting a GGUF file's vocabulary once."""
    from transformers import AutoTokenizer

    try:
        if path.suffix != ".gguf":
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        converted = gguf_cache(path) / "tokenizer"
        if converted.exists():
            return AutoTokenizer.from_pretrained(converted)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        partial = converted.with_name(f"tokenizer.partial-{os.getpid()}")
        tokenizer.save_pretrained(partial)
        _publish(partial, converted)
        return tokenizer
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"spec.model: cannot load a tokenizer from {path}: {err}") from err
