"""Turns a pod spec into local processes' argv, env, working dir and files (pod runner part 1).

No mounts are possible here (no root-only namespaces on CI, no image filesystem), so the runner
gives every volume a local directory and *rewrites* the container's absolute mount paths, where
they appear in command, args, env values, workingDir and ConfigMap-rendered files, to those
directories. Headless-service hostnames (``<host>.<subdomain>[.<ns>.svc[.cluster.local]]``) are
rewritten to 127.0.0.1 the same way, since every pod of this harness shares loopback.
README.md describes the limits that follow from this.
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Obj = dict[str, Any]
POD_IP = "127.0.0.1"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"


class ConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError (missing ConfigMap key, ...)."""


class StartError(Exception):
    """What a kubelet reports as a container that could not start (no such executable)."""


class ObjectSource(Protocol):
    """Reads the API objects a pod refers to (implemented by the pod runner)."""

    def configmap(self, namespace: str, name: str) -> Obj | None: ...
    def secret(self, namespace: str, name: str) -> Obj | None: ...
    def service_account_token(self, namespace: str, sa: str, audience: str | None) -> str: ...
    def claim_dir(self, namespace: str, claim: str) -> Path: ...
    def headless_services(self, namespace: str) -> list[str]: ...


@dataclass
class Rewriter:
    """Rewrites mount paths to local paths and pod DNS names to loopback in one pass."""

    paths: dict[str, str] = field(default_factory=dict)
    subdomains: list[str] = field(default_factory=list)
    namespace: str = "default"

    def pattern(self) -> re.Pattern[str] | None:
        alternatives: list[str] = []
        # Longest mount path first so /data/cache wins over /data.
        for mount in sorted(self.paths, key=len, reverse=True):
            alternatives.append(r"(?<![\w.\-/])" + re.escape(mount) + r"(?=/|$|[^\w.\-])")
        ns = re.escape(self.namespace)
        for sub in self.subdomains:
            s = re.escape(sub)
            host = rf"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.{s}|{s}\.{ns}\.svc)"
            alternatives.append(
                rf"(?<![\w.\-]){host}(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?"
                r"(?:\.cluster\.local)?(?![\w\-]|\.\w)"
            )
        return re.compile("|".join(f"(?:{a})" for a in alternatives)) if alternatives else None

    def __call__(self, text: str) -> str:
        pattern = self.pattern()
        if pattern is None:
            return text

        def replace(match: re.Match[str]) -> str:
            found = match.group(0)
            return self.paths.get(found, POD_IP)

        return pattern.sub(replace, text)


@dataclass
class Container:
    """One container, ready to exec."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    termination_log: Path
    fallback_to_logs: bool


def quantity(text: str) -> float:
    """Parses a Kubernetes resource quantity ('500m', '2Gi', '1e3') into a float."""
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
        "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
        "E": 1e18,
    }  # fmt: skip
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names expand, $$ escapes, unknown stay as-is."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)", repl, value)


def field_ref(pod: Obj, path: str) -> str:
    """The downward-API value of a fieldRef.fieldPath."""
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple: dict[str, str] = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    raise ConfigError(f"unsupported fieldRef {path!r}")


def resource_ref(container: Obj, ref: Obj) -> str:
    """resourceFieldRef: limits/requests, rounded up by the divisor; unset limits use the host."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "limits":
        raw = str(os.cpu_count() or 1) if resource == "cpu" else None
        if resource == "memory":
            raw = str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    value = quantity(str(raw)) if raw is not None else 0.0
    divisor = quantity(str(ref.get("divisor", "1")))
    return str(math.ceil(value / divisor))


def _configmap_values(obj: Obj) -> dict[str, bytes]:
    values = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    values.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return values


def _secret_values(obj: Obj) -> dict[str, bytes]:
    values = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    values.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return values


def _lookup(
    source: ObjectSource, kind: str, ns: str, name: str, optional: bool
) -> dict[str, bytes] | None:
    obj = source.configmap(ns, name) if kind == "configmap" else source.secret(ns, name)
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{name}" not found')
    return _configmap_values(obj) if kind == "configmap" else _secret_values(obj)


def container_env(
    pod: Obj, container: Obj, source: ObjectSource, base: dict[str, str]
) -> dict[str, str]:
    """The env a kubelet would give: base, then envFrom in order, then env in order."""
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    for item in container.get("envFrom") or []:
        prefix = item.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = item.get(key)
            if ref:
                values = _lookup(source, kind, ns, ref["name"], bool(ref.get("optional")))
                for k, v in (values or {}).items():
                    env[prefix + k] = v.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = expand(var["value"], env)
            continue
        value_from = var.get("valueFrom") or {}
        if "fieldRef" in value_from:
            env[name] = field_ref(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            env[name] = resource_ref(container, value_from["resourceFieldRef"])
        else:
            for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                ref = value_from.get(key)
                if not ref:
                    continue
                optional = bool(ref.get("optional"))
                values = _lookup(source, kind, ns, ref["name"], optional)
                if values is not None and ref["key"] in values:
                    env[name] = values[ref["key"]].decode(errors="replace")
                elif not optional:
                    raise ConfigError(f'key "{ref["key"]}" not found in {kind} "{ref["name"]}"')
        if name not in env:
            env.setdefault(name, "")
    return env


def _write_items(
    target: Path, values: dict[str, bytes], items: list[Obj] | None, mode: int, what: str
) -> None:
    """Renders ConfigMap/Secret keys as files, honouring ``items`` (key -> path, mode)."""
    target.mkdir(parents=True, exist_ok=True)
    chosen: Iterable[tuple[str, str, int]]
    if items:
        missing = [i["key"] for i in items if i["key"] not in values]
        if missing:
            raise ConfigError(f"{what}: keys {missing} not found")
        chosen = [(i["key"], i["path"], int(i.get("mode", mode))) for i in items]
    else:
        chosen = [(k, k, mode) for k in values]
    for key, rel, file_mode in chosen:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(values[key])
        path.chmod(file_mode)


def prepare_volumes(pod: Obj, pod_root: Path, source: ObjectSource) -> dict[str, Path]:
    """Creates a local directory for each pod volume; returns volume name -> directory."""
    ns = pod["metadata"]["namespace"]
    dirs: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            dirs[name] = source.claim_dir(ns, vol["persistentVolumeClaim"]["claimName"])
        elif "hostPath" in vol:
            dirs[name] = Path(vol["hostPath"]["path"])  # the "node" is this machine
        else:
            dirs[name] = pod_root / "volumes" / name
            dirs[name].mkdir(parents=True, exist_ok=True)
    # Config files name the paths the containers see; point them at the local directories.
    rewrite = Rewriter(mount_paths(pod, dirs), [], ns)
    for vol in pod["spec"].get("volumes") or []:
        target = dirs[vol["name"]]
        if "configMap" in vol or "secret" in vol:
            kind = "configmap" if "configMap" in vol else "secret"
            spec = vol.get("configMap") or vol["secret"]
            ref_name = spec.get("name") or spec.get("secretName", "")
            values = _lookup(source, kind, ns, ref_name, bool(spec.get("optional")))
            if kind == "configmap" and values:
                values = {k: _rewrite_text(v, rewrite) for k, v in values.items()}
            mode = int(spec.get("defaultMode", 0o644))
            _write_items(target, values or {}, spec.get("items"), mode, f"{kind} {ref_name}")
        elif "projected" in vol:
            _project(pod, vol["projected"], target, source, rewrite)
        elif "downwardAPI" in vol:
            _downward_files(pod, vol["downwardAPI"].get("items") or [], target)
        # emptyDir (and anything unknown) is just the fresh directory.
    return dirs


def mount_paths(pod: Obj, dirs: dict[str, Path], only: str | None = None) -> dict[str, str]:
    """mountPath -> local path for the containers' volumeMounts (``only``: one container)."""
    paths: dict[str, str] = {}
    for c in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]:
        if only is not None and c["name"] != only:
            continue
        for mount in c.get("volumeMounts") or []:
            local = dirs.get(mount["name"])
            if local is None or mount["mountPath"].rstrip("/") in ("", "/tmp"):
                # /tmp: processes here share the host's, where tests keep their files (a
                # trainer pod's /tmp emptyDir only matters under a read-only root).
                continue
            if mount.get("subPath"):
                local = local / mount["subPath"]
            paths.setdefault(mount["mountPath"].rstrip("/"), str(local))
    return paths


def _rewrite_text(data: bytes, rewrite: Rewriter) -> bytes:
    try:
        return rewrite(data.decode()).encode()
    except UnicodeDecodeError:
        return data


def _downward_files(pod: Obj, items: list[Obj], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in items:
        if "fieldRef" in item:
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(field_ref(pod, item["fieldRef"]["fieldPath"]))


def _project(pod: Obj, spec: Obj, target: Path, source: ObjectSource, rewrite: Rewriter) -> None:
    ns = pod["metadata"]["namespace"]
    mode = int(spec.get("defaultMode", 0o644))
    for src in spec.get("sources") or []:
        if "configMap" in src or "secret" in src:
            kind = "configmap" if "configMap" in src else "secret"
            ref = src.get("configMap") or src["secret"]
            values = _lookup(source, kind, ns, ref["name"], bool(ref.get("optional")))
            if kind == "configmap" and values:
                values = {k: _rewrite_text(v, rewrite) for k, v in values.items()}
            _write_items(target, values or {}, ref.get("items"), mode, f"{kind} {ref['name']}")
        elif "downwardAPI" in src:
            _downward_files(pod, src["downwardAPI"].get("items") or [], target)
        elif "serviceAccountToken" in src:
            tok = src["serviceAccountToken"]
            sa = pod["spec"].get("serviceAccountName", "default")
            (target / tok["path"]).write_text(
                source.service_account_token(ns, sa, tok.get("audience"))
            )


def resolve_executable(argv0: str, python: str) -> str:
    """Maps the image's executable to one on this machine.

    ``python``/``python3``/``python3.X`` become the interpreter the harness runs under (the
    project's venv); other names are looked up next to it (torchrun, accelerate, ...) and then
    on PATH.
    """
    base = os.path.basename(argv0)
    if re.fullmatch(r"python(3(\.\d+)?)?", base):
        return python
    beside = Path(python).parent / base
    if beside.exists():
        return str(beside)
    found = shutil.which(argv0) or shutil.which(base)
    if not found:
        raise StartError(f'exec: "{argv0}": executable file not found in $PATH')
    return found


def prepare_container(
    pod: Obj,
    container: Obj,
    volumes: dict[str, Path],
    pod_root: Path,
    source: ObjectSource,
    base_env: dict[str, str],
    entrypoints: dict[str, list[str]],
    python: str = sys.executable,
) -> Container:
    """argv/env/cwd of one container, with mount paths and pod hostnames rewritten."""
    name = container["name"]
    ns = pod["metadata"]["namespace"]
    paths = mount_paths(pod, volumes, only=name)
    term_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    termination_log = pod_root / "termination" / name
    termination_log.parent.mkdir(parents=True, exist_ok=True)
    termination_log.write_bytes(b"")
    paths[term_path] = str(termination_log)
    subdomains = set(source.headless_services(ns))
    if pod["spec"].get("subdomain"):
        subdomains.add(pod["spec"]["subdomain"])
    rewrite = Rewriter(paths, sorted(subdomains), ns)

    env = container_env(pod, container, source, base_env)
    env = {k: rewrite(v) for k, v in env.items()}
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if not command:
        image = container.get("image", "")
        entry = entrypoints.get(image) or entrypoints.get(image.rsplit(":", 1)[0])
        if entry is None:
            raise StartError(f"no command and no entrypoint known for image {image!r}")
        command = list(entry)
    argv = [rewrite(expand(a, env)) for a in command + args]
    argv[0] = resolve_executable(argv[0], python)

    cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else None
    if cwd is None or not cwd.is_absolute():
        cwd = pod_root / "workdir" / name
    cwd.mkdir(parents=True, exist_ok=True)
    return Container(
        name=name,
        argv=argv,
        env=env,
        cwd=cwd,
        log=pod_root / "logs" / f"{name}.log",
        termination_log=termination_log,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
    )
