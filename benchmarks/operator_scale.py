"""Operator at scale: 500 FineTuneJobs created at once on the real test control plane.

Starts the tier-3 control plane (tests/cluster, `up` in a private state directory: etcd,
kube-apiserver, controller-manager, scheduler, kwok), runs `kubetune operator` as a child
process *without* the pod-runner label, so the training pods land on kwok's fake GPU nodes,
then creates N FineTuneJobs concurrently and reports:

- time until every FineTuneJob has its Job, and until every one reached Running or a later
  phase ("fully reconciled");
- reconcile latency p50/p99 from the operator's own histogram
  (`kubetune_operator_reconcile_time_seconds`, interpolated within buckets as Prometheus'
  histogram_quantile does);
- the operator's peak RSS (VmHWM of its process);
- API writes per job, counted by the apiserver (`apiserver_request_total`, every verb but
  GET/LIST/WATCH, before and after) on the resources only the operator writes, plus the
  Events it posted (Event objects about FineTuneJobs);
- writes during a quiet period afterwards (the safety net must write nothing), and the
  operator's CPU then (user + system seconds per second, with every job finished).

kwok plays the pods with its "fast" stages: a pod goes Running at once and, being owned by a
Job, Succeeded at once, so the Job completes within seconds and most FineTuneJobs go Pending ->
Succeeded without a Running status in between. Writes are counted until every job is
Succeeded, an upper bound of the writes needed to reach Running.

    .venv/bin/python benchmarks/operator_scale.py [--jobs 500] [--creators 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.procs import free_port, wait_until  # noqa: E402

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
KUBETUNE = str(Path(sys.executable).parent / "kubetune")
NAMESPACE = "bench"
JOB_LABEL = "kubetune.io/job-name"
READ_VERBS = {"GET", "LIST", "WATCH", "CONNECT"}
# (group, resource, subresource) that only the operator writes here (the benchmark's own
# FineTuneJob POSTs are subtracted; Job and PVC status belong to their controllers).
OPERATOR_RESOURCES = {
    ("kubetune.io", "finetunejobs", ""),
    ("kubetune.io", "finetunejobs", "status"),
    ("", "configmaps", ""),
    ("", "services", ""),
    ("batch", "jobs", ""),
    ("", "persistentvolumeclaims", ""),
}
REACHED = {"Running", "Merging", "Succeeded"}
ANY = {"Pending", "Queued", "Suspended", "Failed", *REACHED}


def finetunejob(name: str) -> dict[str, Any]:
    """A small quickstart-like job: 1 node x 1 GPU, tolerating the kwok GPU nodes' taint,
    writing to one shared, pre-bound claim."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"path": "/models/base"},
            "data": {"datasets": [{"path": "/models/identity.jsonl", "format": "messages"}]},
            "method": {"type": "lora"},
            "training": {"maxSteps": 10},
            "distributed": {"nodes": 1, "gpusPerNode": 1},
            "resources": {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ]
            },
            "output": {"claimName": "models"},
        },
    }


# -- cluster set-up -------------------------------------------------------------------------------


def install_crd(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    manifest = yaml.safe_load((REPO / "crds" / "finetunejob.yaml").read_text())
    ext.create_custom_resource_definition(manifest)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(manifest["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_until("CRD Established", established, 60)
    objects = client.CustomObjectsApi(api)
    wait_until(
        "finetunejobs served",
        lambda: objects.list_cluster_custom_object(GROUP, VERSION, PLURAL) or True,
        30,
    )


def make_namespace(api: client.ApiClient, root: Path) -> None:
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    wait_until(
        "the default service account",
        lambda: core.read_namespaced_service_account("default", NAMESPACE),
        60,
    )
    # One shared output claim, bound by hand to a hostPath PV (nothing runs on kwok nodes).
    (root / "pv").mkdir(exist_ok=True)
    core.create_persistent_volume(
        {
            "metadata": {"name": "bench-models"},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": str(root / "pv")},
                "claimRef": {"namespace": NAMESPACE, "name": "models"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": "bench-models",
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )
    wait_until(
        "the claim Bound",
        lambda: (
            core.read_namespaced_persistent_volume_claim("models", NAMESPACE).status.phase
            == "Bound"
        ),
        60,
    )


# -- measurements ---------------------------------------------------------------------------------


def scrape(url_or_api: str | client.ApiClient) -> dict[str, list[Any]]:
    """Prometheus families by name: [(labels, value)] per sample name."""
    if isinstance(url_or_api, str):
        with urllib.request.urlopen(url_or_api, timeout=10) as response:
            text = response.read().decode()
    else:
        api = url_or_api
        response = api.rest_client.pool_manager.request(
            "GET", api.configuration.host + "/metrics", preload_content=True
        )
        text = response.data.decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def writes(metrics: dict[str, list[Any]]) -> Counter[tuple[str, str, str, str]]:
    """apiserver_request_total of write verbs by (group, resource, subresource, verb)."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for labels, value in metrics.get("apiserver_request_total", []):
        if labels.get("verb") in READ_VERBS:
            continue
        key = (labels.get("group", ""), labels.get("resource", ""),
               labels.get("subresource", ""), labels["verb"])  # fmt: skip
        counts[key] += int(value)
    return counts


def histogram(metrics: dict[str, list[Any]], name: str) -> tuple[list[tuple[float, float]], float]:
    buckets = sorted(
        (float(labels["le"]), value) for labels, value in metrics.get(f"{name}_bucket", [])
    )
    count = sum(value for _, value in metrics.get(f"{name}_count", []))
    return buckets, count


def quantile(
    q: float, buckets: list[tuple[float, float]], before: list[tuple[float, float]]
) -> float:
    """histogram_quantile over the difference of two cumulative histograms."""
    earlier = dict(before)
    diff = [(le, value - earlier.get(le, 0.0)) for le, value in buckets]
    total = diff[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in diff:
        if count >= rank:
            if le == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(count - lower_count, 1e-9)
            return lower_bound + (le - lower_bound) * share
        lower_bound, lower_count = le, count
    return lower_bound


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm(pid: int, key: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident set of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Watcher:
    """Watches FineTuneJobs and Jobs in the namespace; records when each job first reached
    each phase and when its first Job appeared (seconds since `t0`)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.t0 = time.monotonic()
        self.phases: dict[str, dict[str, float]] = {}
        self.jobs: dict[str, float] = {}
        self.complete: dict[str, float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch_ftjs, daemon=True),
            threading.Thread(target=self._watch_jobs, daemon=True),
        ]

    def start(self) -> Watcher:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _stream(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Watch events for ever: a watch that ends, errs or hangs (a read timeout) is
        started again (with a fresh listing, so nothing is lost for long)."""
        while not self._stop.is_set():
            try:
                yield from watch.Watch().stream(
                    call, *args, timeout_seconds=20, _request_timeout=(10, 30), **kwargs
                )
            except Exception as err:  # restart on anything
                print(f"watch restarted: {err!r:.200}", flush=True)
                time.sleep(0.5)

    def _watch_ftjs(self) -> None:
        objects = client.CustomObjectsApi(self.api)
        stream = self._stream(
            objects.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL
        )
        for event in stream:
            obj = event["object"]
            phase = (obj.get("status") or {}).get("phase") if isinstance(obj, dict) else None
            if phase:
                with self.lock:
                    seen = self.phases.setdefault(obj["metadata"]["name"], {})
                    seen.setdefault(phase, self._now())
            if self._stop.is_set():
                return

    def _watch_jobs(self) -> None:
        batch = client.BatchV1Api(self.api)
        for event in self._stream(batch.list_namespaced_job, NAMESPACE, label_selector=JOB_LABEL):
            job = event["object"]
            if getattr(job, "metadata", None) is not None:
                owner = job.metadata.labels[JOB_LABEL]
                with self.lock:
                    self.jobs.setdefault(owner, self._now())
                    if any(c.type == "Complete" for c in job.status.conditions or []):
                        self.complete.setdefault(owner, self._now())
            if self._stop.is_set():
                return

    def count(self, phases: set[str]) -> int:
        with self.lock:
            return sum(1 for seen in self.phases.values() if phases & set(seen))

    def first(self, phases: set[str]) -> list[float]:
        with self.lock:
            return [
                min(t for p, t in seen.items() if p in phases)
                for seen in self.phases.values()
                if phases & set(seen)
            ]


# -- the run --------------------------------------------------------------------------------------


def start_operator(
    kubeconfig: str, log: Path, metrics_port: int, interval: float, verbose: bool
) -> Any:
    argv = [
        KUBETUNE, "operator", "--namespace", NAMESPACE,
        "--metrics-port", str(metrics_port), "--health-port", str(free_port()),
        "--reconcile-interval", str(interval), "--log-format", "plain",
        *(["--verbose"] if verbose else []),
    ]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace, kubeconfig: str, root: Path) -> dict[str, Any]:
    api = config.new_client_from_config(kubeconfig)
    api.configuration.connection_pool_maxsize = args.creators
    api = client.ApiClient(api.configuration)
    install_crd(api)
    make_namespace(api, root)

    metrics_port = free_port()
    operator_url = f"http://127.0.0.1:{metrics_port}/metrics"
    log = root / "operator.log"
    proc = start_operator(kubeconfig, log, metrics_port, args.reconcile_interval, args.verbose)
    try:

        def alive() -> str | None:
            code = proc.poll()
            return None if code is None else f"operator exited {code}: {log.read_text()[-3000:]}"

        wait_until("operator metrics", lambda: scrape(operator_url) or None, 60, alive=alive)
        time.sleep(3)  # kopf's watches established
        api_before = scrape(api)
        op_before = scrape(operator_url)

        watcher = Watcher(api).start()
        time.sleep(1)
        objects = client.CustomObjectsApi(api)
        names = [f"bench-{i:04d}" for i in range(args.jobs)]
        t0 = time.monotonic()
        watcher.t0 = t0
        with ThreadPoolExecutor(args.creators) as pool:
            list(pool.map(
                lambda n: objects.create_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(n)
                ),
                names,
            ))  # fmt: skip
        created = time.monotonic() - t0
        print(f"created {args.jobs} FineTuneJobs in {created:.1f}s", flush=True)

        wait_until(
            "every job has its Job",
            lambda: len(watcher.jobs) >= args.jobs,
            args.timeout,
            interval=0.2,
            alive=alive,
        )
        all_jobs = time.monotonic() - t0
        wait_until(
            "every job Running or later",
            lambda: watcher.count(REACHED) >= args.jobs,
            args.timeout,
            interval=0.2,
            alive=alive,
        )
        reconciled = time.monotonic() - t0
        op_reconciled = scrape(operator_url)
        wait_until(
            "every job Succeeded",
            lambda: watcher.count({"Succeeded"}) >= args.jobs,
            args.timeout,
            interval=0.2,
            alive=alive,
        )
        succeeded = time.monotonic() - t0
        time.sleep(2)  # the last Events are posted asynchronously
        api_after = scrape(api)
        cpu_before = cpu_seconds(proc.pid)
        time.sleep(args.quiet)
        quiet_cpu = (cpu_seconds(proc.pid) - cpu_before) / args.quiet
        api_quiet = scrape(api)
        op_after = scrape(operator_url)
        peak, end = vm(proc.pid), vm(proc.pid, "VmRSS")
        watcher.stop()

        events = (
            client.CoreV1Api(api)
            .list_namespaced_event(NAMESPACE, field_selector="involvedObject.kind=FineTuneJob")
            .items
        )
        event_reasons = Counter(e.reason for e in events)
        sample = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, names[0])[
            "metadata"
        ]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    delta = writes(api_after) - writes(api_before)
    quiet = writes(api_quiet) - writes(api_after)
    operator_writes = Counter({k: v for k, v in delta.items() if k[:3] in OPERATOR_RESOURCES})
    operator_writes[("kubetune.io", "finetunejobs", "", "POST")] -= args.jobs  # ours
    operator_writes += Counter()  # drop zeroes
    operator_events = sum(event_reasons.values())
    quiet_operator = sum(v for k, v in quiet.items() if k[:3] in OPERATOR_RESOURCES)
    name = "kubetune_operator_reconcile_time_seconds"
    buckets, _ = histogram(op_reconciled, name)
    base, base_count = histogram(op_before, name)
    _, reconciles = histogram(op_reconciled, name)
    _, reconciles_total = histogram(op_after, name)
    to_running = watcher.first(REACHED)
    job_times = list(watcher.jobs.values())
    return {
        "jobs": args.jobs,
        "reconcile_interval_s": args.reconcile_interval,
        "create_s": round(created, 1),
        "all_jobs_created_s": round(all_jobs, 1),
        "job_created_p50_s": round(percentile(job_times, 0.5), 1),
        "job_created_p99_s": round(percentile(job_times, 0.99), 1),
        "all_status_written_s": round(max(watcher.first(ANY)), 1),
        "all_jobs_complete_s": round(max(watcher.complete.values()), 1),
        "job_complete_p50_s": round(percentile(list(watcher.complete.values()), 0.5), 1),
        "all_reconciled_s": round(reconciled, 1),
        "running_or_later_p50_s": round(percentile(to_running, 0.5), 1),
        "running_or_later_p99_s": round(percentile(to_running, 0.99), 1),
        "all_succeeded_s": round(succeeded, 1),
        "saw_running": sum(1 for seen in watcher.phases.values() if "Running" in seen),
        "reconciles_until_all_reconciled": int(reconciles - base_count),
        "reconcile_p50_ms": round(1000 * quantile(0.5, buckets, base), 1),
        "reconcile_p99_ms": round(1000 * quantile(0.99, buckets, base), 1),
        "reconciles_total": int(reconciles_total - base_count),
        "operator_peak_rss_mib": round(peak, 1),
        "operator_rss_at_end_mib": round(end, 1),
        "operator_writes_per_job": round(
            (sum(operator_writes.values()) + operator_events) / args.jobs, 2
        ),
        "operator_writes_by_kind": {
            "/".join(filter(None, k)): v for k, v in sorted(operator_writes.items())
        },
        "operator_events": dict(event_reasons),
        "all_writes_by_kind": {"/".join(filter(None, k)): v for k, v in sorted(delta.items())},
        "quiet_s": args.quiet,
        "operator_writes_while_quiet": quiet_operator,
        "operator_cpu_while_quiet_cores": round(quiet_cpu, 4),
        "sample_finalizers": sample.get("finalizers"),
        "sample_annotations": sorted(sample.get("annotations") or {}),
        "mean_phase_count": round(statistics.mean(len(s) for s in watcher.phases.values()), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--creators", type=int, default=16, help="threads creating the jobs")
    parser.add_argument("--reconcile-interval", type=float, default=10.0)
    parser.add_argument("--quiet", type=float, default=20.0, help="seconds of quiet at the end")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--operator-log", type=Path, help="keep the operator's log here")
    parser.add_argument("--verbose", action="store_true", help="the operator's debug log")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        root = Path(tmp)
        state_dir = root / "cluster-state"
        # `up` and `down` in their own processes: `down` waits for the supervisor to be
        # gone, which a zombie child of this process never is.
        harness = [sys.executable, "-m", "tests.cluster"]
        started = subprocess.run([*harness, "up", "--state-dir", str(state_dir)], cwd=REPO)
        if started.returncode != 0:
            print((state_dir / "serve.log").read_text()[-3000:], file=sys.stderr)
            return 1
        try:
            state = json.loads((state_dir / "state.json").read_text())
            figures = run(args, state["kubeconfig"], root)
        finally:
            with contextlib.suppress(Exception):
                if args.operator_log:
                    args.operator_log.write_bytes((root / "operator.log").read_bytes())
                if Path(root / "operator.log").exists():
                    tail = (root / "operator.log").read_text().splitlines()[-5:]
                    print("operator log tail:\n  " + "\n  ".join(tail), flush=True)
            subprocess.run([*harness, "down", "--state-dir", str(state_dir)], cwd=REPO)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
