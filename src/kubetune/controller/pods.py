"""The Indexed Job of one attempt of a run, and its pods: the trainer's command (under
torchrun across nodes), resources, volumes, the restricted Pod Security profile, the Hub
token by reference, scheduling fields and the retry rules of its pod failure policy.

Pure, like children.py, whose names and metadata it uses.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJob
from kubetune.api.pod_paths import MANIFEST_FILE, config_map_items
from kubetune.api.spec import FineTuneJobSpec
from kubetune.controller.children import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    HF_TOKEN_ENV,
    IF_FINISHED_ENV,
    KUEUE_QUEUE_LABEL,
    RETRAIN_TOKEN_ANNOTATION,
    Owner,
    Settings,
    base_name,
    claim_name,
    job_name,
    labels,
    metadata,
    output_dir,
)

Obj = dict[str, Any]


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
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[Obj] = [
        {"name": "config", "projected": {"sources": _config_sources(spec, run)}},
        {"name": "output", "persistentVolumeClaim": {"claimName": claim_name(job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(res.shared_memory)}},
        # The root filesystem is read-only; caches (HF_HOME, the converted model, Triton's
        # kernels) go to /tmp, where the trainer image points them, on the node's disk.
        {"name": "tmp", "emptyDir": {}},
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
            *[_env_var(var) for var in spec.env],
        ],
        "envFrom": [_env_from(source) for source in spec.env_from],
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
            "readOnlyRootFilesystem": True,
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


def _config_sources(spec: FineTuneJobSpec, run: str) -> list[Obj]:
    """The manifest, and the user's data files at the relative paths the spec reads them
    from: in the pod they sit next to the manifest, as on the machine that wrote it."""
    sources: list[Obj] = [{"configMap": {"name": base_name(run)}}]
    items = config_map_items(spec)
    if spec.data.config_map is not None and items:
        sources.append({"configMap": {"name": spec.data.config_map, "items": items}})
    return sources


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


def _env_var(var: Any) -> Obj:
    """An EnvVar of the spec as core/v1 writes it (valueFrom by reference only)."""
    out: Obj = {"name": var.name}
    if var.value is not None:
        out["value"] = var.value
    source = var.value_from
    if source is not None:
        ref = source.secret_key_ref or source.config_map_key_ref
        kind = "secretKeyRef" if source.secret_key_ref else "configMapKeyRef"
        out["valueFrom"] = {kind: {"name": ref.name, "key": ref.key}}
    return out


def _env_from(source: Any) -> Obj:
    out: Obj = (
        {"secretRef": {"name": source.secret_ref}}
        if source.secret_ref is not None
        else {"configMapRef": {"name": source.config_map_ref}}
    )
    if source.prefix:
        out["prefix"] = source.prefix
    return out


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
    are ignored in a one-pod attempt, so the Job controller replaces that pod without using
    up an attempt. In a multi-node attempt a disrupted pod fails the Job at once by its own
    rule (its peers cannot go on without it), and the operator creates the same attempt again
    whole (observe.disruption); the Job's failure reason says why, after the pod is gone.
    """
    spec = job.spec
    nodes = spec.distributed.nodes
    meta = metadata(job_name(run, attempt), owner, run)
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
                {
                    "action": "Ignore" if nodes == 1 else "FailJob",
                    "onPodConditions": [{"type": "DisruptionTarget"}],
                },
            ]
        },
        # Kueue admits a queued Job by unsuspending it; spec.suspend pauses it.
        "suspend": bool(queue) or spec.run_policy.suspend,
        "template": pod_template(job, owner, run, attempt, settings),
    }
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
