"""`kubetune operator`: run the FineTuneJob operator (kopf) against the current cluster.

In a pod it uses the in-cluster ServiceAccount; elsewhere the kubeconfig ($KUBECONFIG or
~/.kube/config).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from typing import Any


def register(commands: Any) -> None:
    parser = commands.add_parser("operator", help="run the FineTuneJob operator (kopf)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; glob patterns allowed)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch the whole cluster (default)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="operator /metrics port (0: off)"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8081,
        help="liveness endpoint port, /healthz (0: off)",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate replicas through this KopfPeering (default: standalone, one replica)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority: of the live replicas, the highest one works and the others "
        "wait (default with --peering: derived from $POD_ID or the host name, so replicas "
        "never tie; kopf freezes every replica on a tie)",
    )
    parser.add_argument("--log-format", choices=("plain", "full", "json"), default="full")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--trainer-image", help="default trainer image for FineTuneJobs")
    parser.add_argument(
        "--pod-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra label on every training pod (repeatable)",
    )
    parser.add_argument(
        "--trainer-metrics-port", type=int, default=9090, help="the trainer pods' metrics port"
    )
    parser.add_argument(
        "--rendezvous-port", type=int, default=29500, help="torchrun master port in the pods"
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=10.0,
        help="seconds between safety-net reconciles of an unfinished job (events drive the rest)",
    )
    parser.add_argument(
        "--finished-interval",
        type=float,
        default=300.0,
        help="seconds between safety-net reconciles of a Succeeded or Failed job",
    )
    parser.add_argument(
        "--pod-run-as-user",
        type=int,
        help="runAsUser/runAsGroup of training pods (default: the image's user)",
    )
    parser.add_argument(
        "--pod-fs-group",
        type=int,
        help="fsGroup of training pods, for volumes the image's user cannot write",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        help="least seconds between two progress-only status writes",
    )
    parser.set_defaults(run=run)


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--pod-label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def peering_priority(explicit: int | None) -> int:
    """A replica's priority: given, or a hash of its pod name (kopf's own identity, $POD_ID)
    or host name, in 1 .. 2**31-1; distinct names practically never collide."""
    if explicit is not None:
        return explicit
    seed = os.environ.get("POD_ID") or socket.gethostname()
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") % (2**31 - 1) + 1


def run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune.controller.children import Settings
    from kubetune.controller.handlers import build_registry
    from kubetune.controller.reconciler import Config

    try:
        pod_labels = _labels(args.pod_label)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = Settings(
        pod_labels=pod_labels,
        metrics_port=args.trainer_metrics_port,
        master_port=args.rendezvous_port,
        run_as_user=args.pod_run_as_user,
        fs_group=args.pod_fs_group,
        **({"trainer_image": args.trainer_image} if args.trainer_image else {}),
    )
    config = Config(
        settings=settings,
        reconcile_interval=args.reconcile_interval,
        finished_interval=args.finished_interval,
        status_interval=args.status_interval,
    )
    log_format = {
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
        "json": kopf.LogFormat.JSON,
    }[args.log_format]
    kopf.configure(verbose=args.verbose, log_format=log_format)
    if args.metrics_port:
        port = config.metrics.serve(args.metrics_port)
        print(f"kubetune operator: metrics on :{port}/metrics", flush=True)
    kopf.run(
        registry=build_registry(config),
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=peering_priority(args.priority) if args.peering else 0,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz"
        if args.health_port
        else None,
    )
    return 0
