"""What one run of a FineTuneJob consists of, rendered as plain Kubernetes objects.

Pure functions: given the FineTuneJob (validated), its metadata and the operator's settings,
they return the ConfigMap (the manifest the trainer reads), the headless Service (the pods'
subdomain, for rendezvous), the Indexed Job of one attempt and the output PVC. Every name is
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

from kubetune.api import FineTuneJob
from kubetune.api.spec import GROUP, KIND, VERSION, FineTuneJobSpec

Obj = dict[str, Any]

LABEL_PREFIX = "kubetune.io"
JOB_LABEL = f"{LABEL_PREFIX}/job-name"  # the FineTuneJob's name
RUN_LABEL = f"{LABEL_PREFIX}/run"  # the run's base name (the run id, shortened)
ATTEMPT_LABEL = f"{LABEL_PREFIX}/attempt"
RUN_ID_ANNOTATION = f"{LABEL_PREFIX}/run-id"  # the full run id (may exceed a label's 63)
RETRAIN_TOKEN_ANNOTATION = f"{LABEL_PREFIX}/retrain-token"
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
MANIFEST_FILE = "finetunejob.yaml"
EXIT_PREEMPTED = 75  # the trainer's exit code after saving a checkpoint on SIGTERM
EXIT_INVALID = 2  # bad spec, data, model or output: no retry can fix it
IF_FINISHED_ENV = "KUBETUNE_IF_FINISHED"  # the default of `kubetune train --if-finished`
HF_TOKEN_ENV = "HF_TOKEN"  # read by huggingface_hub for gated and private repositories


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape every rendered child."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
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


def _metadata(name: str, owner: Owner, run: str, owned: bool = True) -> Obj:
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
        "metadata": _metadata(base_name(run), owner, run),
        "data": {MANIFEST_FILE: yaml.safe_dump(manifest, sort_keys=False)},
    }


def service(owner: Owner, run: str, settings: Settings) -> Obj:
    """Headless Service: pod i of attempt n is `<job>-<i>.<svc>`, resolvable before it is
    ready (rendezvous happens before any readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(base_name(run), owner, run),
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


def trainer_command(job: FineTuneJob, run: str, attempt: int, settings: Settings) -> list[str]:
    """`kubetune train`, under torchrun where more than one process trains."""
    dist = job.spec.distributed
    train = [
        "kubetune",
        "train",
        f"{settings.config_mount}/{MANIFEST_FILE}",
        "--output-dir",
        output_dir(job, settings),
        "--run-id",
        run,
        "--metrics-port",
        str(settings.metrics_port),
        "--termination-log",
        "/dev/termination-log",
    ]
    if dist.nodes == 1 and dist.gpus_per_node <= 1:
        return train
    launcher = ["torchrun", f"--nproc-per-node={max(dist.gpus_per_node, 1)}"]
    if dist.nodes == 1:
        launcher.append("--standalone")
    else:
        # Node rank from the completion index; master is pod 0's stable hostname.
        master = f"{job_name(run, attempt)}-0.{base_name(run)}"
        launcher += [
            f"--nnodes={dist.nodes}",
            "--node-rank=$(NODE_RANK)",
            f"--master-addr={master}",
            f"--master-port={settings.master_port}",
        ]
    return [*launcher, "--no-python", *train]


def _resources(spec: FineTuneJobSpec) -> Obj:
    res = spec.resources
    amounts: dict[str, str] = {}
    if spec.distributed.gpus_per_node > 0:
        amounts[res.gpu_resource_name] = str(spec.distributed.gpus_per_node)
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_template(job: FineTuneJob, owner: Owner, run: str, attempt: int, settings: Settings) -> Obj:
    spec = job.spec
    res = spec.resources
    mounts: list[Obj] = [
        {"name": "config", "mountPath": settings.config_mount, "readOnly": True},
        {"name": "output", "mountPath": settings.output_mount},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": base_name(run)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": claim_name(job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(res.shared_memory)}},
    ]
    for extra in spec.volumes:
        mounts.append(
            {
                "name": f"v-{extra.name}"[:63],
                "mountPath": extra.mount_path,
                "readOnly": extra.read_only,
            }
        )
        volumes.append(
            {
                "name": f"v-{extra.name}"[:63],
                "persistentVolumeClaim": {
                    "claimName": extra.claim_name,
                    "readOnly": extra.read_only,
                },
            }
        )
    container: Obj = {
        "name": CONTAINER,
        "image": spec.image.trainer or settings.trainer_image,
        "imagePullPolicy": spec.image.pull_policy,
        "command": trainer_command(job, run, attempt, settings),
        "env": [
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
                    }
                },
            },
            {"name": "KUBETUNE_RUN_ID", "value": run},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # A FineTuneJob deleted and created again (or re-applied by GitOps after its TTL)
            # finds its finished run on the volume: report it instead of training again. An
            # environment variable, not a flag: an older trainer image ignores it.
            {"name": IF_FINISHED_ENV, "value": "reuse"},
            *_token_env(spec),
        ],
        "ports": [
            {"name": "metrics", "containerPort": settings.metrics_port},
            {"name": "rendezvous", "containerPort": settings.master_port},
        ],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # The trainer writes a JSON summary there; a crash before it leaves the log's tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: Obj = {
        "subdomain": base_name(run),
        "restartPolicy": "Never",
        # The trainer never talks to the API server.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.scheduler_name:
        pod_spec["schedulerName"] = res.scheduler_name
    if res.service_account_name:
        pod_spec["serviceAccountName"] = res.service_account_name
    if spec.image.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image.pull_secrets]
    pod_labels = {**settings.pod_labels, **labels(owner, run), ATTEMPT_LABEL: str(attempt)}
    return {"metadata": {"labels": pod_labels}, "spec": pod_spec}


def _pod_security(settings: Settings) -> Obj:
    """The restricted Pod Security profile; user and fsGroup only where the operator is told
    to set them (the image's user otherwise)."""
    context: Obj = {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        # Also where a platform injects the fsGroup (OpenShift): no recursive chown of a
        # large model volume at every pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
    }
    if settings.run_as_user is not None:
        context["runAsUser"] = context["runAsGroup"] = settings.run_as_user
    if settings.fs_group is not None:
        context["fsGroup"] = settings.fs_group
    return context


def _token_env(spec: FineTuneJobSpec) -> list[Obj]:
    """The Hub token by reference: the pod reads the Secret, the operator never does."""
    ref = spec.model.token_secret
    if ref is None:
        return []
    return [
        {
            "name": HF_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
        }
    ]


def batch_job(
    job: FineTuneJob,
    owner: Owner,
    run: str,
    attempt: int,
    settings: Settings,
    retrain_token: str | None = None,
) -> Obj:
    """The Indexed Job of one attempt of a run: one pod per node.

    Any pod failing fails the whole attempt (backoffLimit 0: one pod down breaks the ring);
    the operator then starts attempt n+1, which resumes from the newest checkpoint. Failures
    that are not the trainer's fault (preemption after a checkpoint, exit 75, or a disruption)
    are ignored, so the Job controller replaces that pod without using up an attempt.
    """
    spec = job.spec
    nodes = spec.distributed.nodes
    meta = _metadata(job_name(run, attempt), owner, run)
    meta["labels"][ATTEMPT_LABEL] = str(attempt)
    if retrain_token:
        meta["annotations"][RETRAIN_TOKEN_ANNOTATION] = retrain_token
    queue = spec.resources.queue_name
    if queue:
        meta["labels"][KUEUE_QUEUE_LABEL] = queue
    job_spec: Obj = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INVALID],
                    },
                },
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_PREEMPTED],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        # Kueue admits a queued Job by unsuspending it; spec.suspend pauses it.
        "suspend": bool(queue) or spec.run_policy.suspend,
        "template": pod_template(job, owner, run, attempt, settings),
    }
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
