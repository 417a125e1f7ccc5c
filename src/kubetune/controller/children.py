"""What one run of a FineTuneJob consists of, rendered as plain Kubernetes objects.

Pure functions: given the FineTuneJob (validated), its metadata and the operator's settings,
they return the ConfigMap (the manifest the trainer reads), the headless Service (the pods'
subdomain, for rendezvous) and the output PVC; pods.py renders the Indexed Job of one attempt
with these names. Every name is
deterministic per run, so a restarted operator finds what it created instead of duplicating
it, and stays within the 63-character limits for any valid FineTuneJob name.

Layout of a run's names (`base` = the run id, hash-shortened to 50 characters):

    ConfigMap, Service   <base>
    Job (attempt n)      <base>-<n>          pods' hostnames <base>-<n>-<index> (<= 58 chars)
    output PVC           <ftj>-output         shared by all runs; never owned by the job
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from kubetune import __version__
from kubetune.api import FineTuneJob
from kubetune.api.pod_paths import MANIFEST_FILE
from kubetune.api.spec import GROUP, KIND, VERSION

Obj = dict[str, Any]

LABEL_PREFIX = "kubetune.io"
JOB_LABEL = f"{LABEL_PREFIX}/job-name"  # the FineTuneJob's name
RUN_LABEL = f"{LABEL_PREFIX}/run"  # the run's base name (the run id, shortened)
ATTEMPT_LABEL = f"{LABEL_PREFIX}/attempt"
RUN_ID_ANNOTATION = f"{LABEL_PREFIX}/run-id"  # the full run id (may exceed a label's 63)
RETRAIN_TOKEN_ANNOTATION = f"{LABEL_PREFIX}/retrain-token"
DISRUPTED_ANNOTATION = f"{LABEL_PREFIX}/disrupted"
"""On an attempt's Job the operator is deleting to create it again whole: why."""
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMMON_LABELS = {
    "app.kubernetes.io/name": "kubetune",
    "app.kubernetes.io/component": "trainer",
    "app.kubernetes.io/managed-by": "kubetune-operator",
}

BASE_NAME_LIMIT = 50  # leaves room for "-<attempt>" and "-<index>" within 63
DNS_LABEL_LIMIT = 63
CONTAINER = "trainer"
EXIT_PREEMPTED = 75  # the trainer's exit code after saving a checkpoint on SIGTERM
EXIT_INVALID = 2  # bad spec, data, model or output: no retry can fix it
IF_FINISHED_ENV = "KUBETUNE_IF_FINISHED"  # the default of `kubetune train --if-finished`
HF_TOKEN_ENV = "HF_TOKEN"  # read by huggingface_hub for gated and private repositories


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape every rendered child."""

    # The image `make images` builds for this release (images/Dockerfile, target trainer).
    trainer_image: str = f"ghcr.io/kubetune/trainer:{__version__}"
    pod_labels: dict[str, str] = field(default_factory=dict)
    """Extra labels on every training pod (e.g. for a PodMonitor, or the test pod runner)."""
    metrics_port: int = 9090
    master_port: int = 29500
    config_mount: str = "/etc/kubetune"
    output_mount: str = "/output"
    run_as_user: int | None = None
    """runAsUser/runAsGroup of training pods; None keeps the image's (numeric) user, and lets
    platforms that assign one per namespace (OpenShift) do so."""
    fs_group: int | None = None
    """fsGroup of training pods, for volumes that are not writable by the image's user."""


# -- names ---------------------------------------------------------------------------------


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def shorten(name: str, limit: int) -> str:
    """`name` if it fits `limit`, else its start and a hash of the whole (still unique)."""
    if len(name) <= limit:
        return name
    head = name[: limit - 9].rstrip("-.")
    return f"{head}-{_digest(name)}"


def dns_label(name: str, limit: int = DNS_LABEL_LIMIT) -> str:
    """A DNS-1035 label (a Service name must start with a letter)."""
    name = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if not name[:1].isalpha():
        name = f"r{name}"
    return shorten(name, limit).rstrip("-")


def base_name(run: str) -> str:
    return dns_label(run, BASE_NAME_LIMIT)


def job_name(run: str, attempt: int) -> str:
    return f"{base_name(run)}-{attempt}"


def output_claim_name(ftj_name: str) -> str:
    return shorten(f"{ftj_name}-output", DNS_LABEL_LIMIT)


def output_sub_path(job: FineTuneJob) -> str:
    return (job.spec.output.sub_path or job.name).strip("/")


def output_dir(job: FineTuneJob, settings: Settings) -> str:
    """Where the trainer writes inside the pod; the run goes to `<this>/<run-id>`."""
    return f"{settings.output_mount}/{output_sub_path(job)}"


def run_output_path(job: FineTuneJob, run: str) -> str:
    """The run's directory relative to the output volume (what status reports)."""
    return f"{output_sub_path(job)}/{run}"


# -- shared metadata ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob object the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> Obj:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def labels(owner: Owner, run: str | None = None) -> dict[str, str]:
    out = {**COMMON_LABELS, JOB_LABEL: owner.name}
    if run is not None:
        out[RUN_LABEL] = base_name(run)
    return out


def metadata(name: str, owner: Owner, run: str, owned: bool = True) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, run),
        "annotations": {RUN_ID_ANNOTATION: run},
    }
    if owned:
        meta["ownerReferences"] = [owner.reference()]
    return meta


# -- children ----------------------------------------------------------------------------------


def config_map(job: FineTuneJob, owner: Owner, run: str) -> Obj:
    """The manifest the trainer reads (the spec as the apiserver stored it, defaults filled)."""
    manifest = FineTuneJob(name=job.name, spec=job.spec, namespace=owner.namespace).to_manifest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(base_name(run), owner, run),
        "data": {MANIFEST_FILE: yaml.safe_dump(manifest, sort_keys=False)},
    }


def service(owner: Owner, run: str, settings: Settings) -> Obj:
    """Headless Service: pod i of attempt n is `<job>-<i>.<svc>`, resolvable before it is
    ready (rendezvous happens before any readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(base_name(run), owner, run),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: owner.name, RUN_LABEL: base_name(run)},
            "ports": [
                {"name": "rendezvous", "port": settings.master_port},
                {"name": "metrics", "port": settings.metrics_port},
            ],
        },
    }


def output_claim(job: FineTuneJob, owner: Owner) -> Obj | None:
    """The output PVC from `output.claimTemplate`, or None when an existing claim is named.

    No owner reference, on purpose: deleting the FineTuneJob must never delete a trained model.
    """
    template = job.spec.output.claim_template
    if template is None:
        return None
    spec: Obj = {
        "accessModes": list(template.access_modes),
        "resources": {"requests": {"storage": str(template.size)}},
    }
    if template.storage_class_name:
        spec["storageClassName"] = template.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": output_claim_name(job.name),
            "namespace": owner.namespace,
            "labels": labels(owner),
        },
        "spec": spec,
    }


def claim_name(job: FineTuneJob) -> str:
    return job.spec.output.claim_name or output_claim_name(job.name)
