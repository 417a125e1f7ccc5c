"""Paths that only make sense on the machine that wrote the manifest.

Locally, relative paths resolve against the manifest's directory. A training pod has no such
directory: the operator mounts the manifest alone (from a ConfigMap it writes), plus, where the
spec names one in `spec.data.configMap`, the user's ConfigMap of data files at the same
relative paths. So a relative model path never works in a pod, and a relative dataset path
works only through that ConfigMap. The operator refuses such a spec before any pod starts;
`kubetune validate` warns about it.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from kubetune.api.spec import PACKAGE_SCHEME, FineTuneJobSpec

MANIFEST_FILE = "finetunejob.yaml"
"""The manifest's name in the pod's manifest directory (a dataset file may not take it)."""
CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def is_relative(path: str) -> bool:
    return not path.startswith(PACKAGE_SCHEME) and not PurePosixPath(path).is_absolute()


def relative_dataset_paths(spec: FineTuneJobSpec) -> list[str]:
    return [d.path for d in spec.data.datasets if d.path is not None and is_relative(d.path)]


def local_only_paths(spec: FineTuneJobSpec) -> list[str]:
    """One message per path a pod could not read, naming the field and what to do instead."""
    problems = []
    model = spec.model.path
    if model is not None and is_relative(model):
        problems.append(
            f"spec.model.path: {model!r} is relative to the manifest, which a pod does not "
            "have; use an absolute path on a volume (spec.volumes), a pkg: path inside the "
            "image, hfRepo or url"
        )
    names: dict[str, str] = {}
    for i, dataset in enumerate(spec.data.datasets):
        path, where = dataset.path, f"spec.data.datasets[{i}].path"
        if path is None or not is_relative(path):
            continue
        if spec.data.config_map is None:
            problems.append(
                f"{where}: {path!r} is relative to the manifest, which a pod does not have; "
                "put the file in a ConfigMap and name it in spec.data.configMap "
                f"(kubectl create configmap NAME --from-file={path}, or a kustomize "
                "configMapGenerator), or use a path on a volume, a url or hfRepo"
            )
            continue
        file = PurePosixPath(path)
        if any(part.startswith("..") for part in file.parts):  # the kubelet refuses "..x" too
            problems.append(
                f"{where}: {path!r} leaves the manifest's directory; the files of "
                "spec.data.configMap can only appear below it"
            )
        elif str(file) == MANIFEST_FILE:
            problems.append(f"{where}: {path!r} is where pods find the manifest itself")
        elif not CONFIG_MAP_KEY.match(file.name):
            problems.append(
                f"{where}: {file.name!r} cannot be a ConfigMap key (letters, digits, '-', "
                "'_' and '.' only)"
            )
        elif (seen := names.setdefault(file.name, str(file))) != str(file):  # a/x, ./a/x: one
            problems.append(
                f"{where}: {path!r} and {seen!r} have the same file name, and a ConfigMap "
                "holds one file per name"
            )
    return problems


def config_map_items(spec: FineTuneJobSpec) -> list[dict[str, str]]:
    """The ConfigMap's keys (file names) projected to the relative paths the spec reads."""
    paths = dict.fromkeys(str(PurePosixPath(p)) for p in relative_dataset_paths(spec))
    return [{"key": PurePosixPath(p).name, "path": p} for p in paths]
