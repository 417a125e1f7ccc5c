"""A Helm release of charts/kubetune on the test cluster, with the operator as a real pod."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.chart.helm import CHART, helm, set_args
from tests.cluster.procs import wait_until

OPERATOR_SELECTOR = "app.kubernetes.io/component=operator,app.kubernetes.io/instance={}"


@dataclass
class Release:
    name: str
    namespace: str
    kubeconfig: Path
    api: client.ApiClient
    values: dict[str, Any] = field(default_factory=dict)

    def install(
        self, chart: Path = CHART, command: str = "install", wait: bool = True, **more: Any
    ) -> str:
        """`helm install` (or upgrade), by default waiting until the Deployment is rolled out."""
        values = {**self.values, **more}
        waiting = ["--wait", "--timeout=4m"] if wait else []
        done = helm(command, self.name, str(chart), "--namespace", self.namespace, *waiting,
                    *set_args(values), kubeconfig=self.kubeconfig)  # fmt: skip
        return done.stdout

    def uninstall(self, check: bool = True) -> str:
        """`helm uninstall` (check=False: a clean-up that must not hide a test's failure)."""
        args = ("uninstall", self.name, "--namespace", self.namespace, "--wait")
        return helm(*args, kubeconfig=self.kubeconfig, check=check).stdout

    def pods(self) -> list[Any]:
        selector = OPERATOR_SELECTOR.format(self.name)
        core = client.CoreV1Api(self.api)
        listed = core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [p for p in listed if p.metadata.deletion_timestamp is None]

    def ready_pods(self) -> list[Any]:
        return [
            p for p in self.pods()
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]  # fmt: skip

    def logs(self, pod: Any) -> str:
        core = client.CoreV1Api(self.api)
        return str(core.read_namespaced_pod_log(pod.metadata.name, self.namespace))

    def alive(self) -> str | None:
        """Why the operator is not working (a restart, a crash loop), or None."""
        for pod in self.pods():
            for status in pod.status.container_statuses or []:
                if status.restart_count:
                    return f"operator pod {pod.metadata.name} restarted:\n{self.tail()}"
        return None

    def tail(self, lines: int = 40) -> str:
        text = []
        for pod in self.pods():
            try:
                log = self.logs(pod).splitlines()[-lines:]
            except client.ApiException as err:
                log = [f"(no log: {err.reason})"]
            text += [f"--- {pod.metadata.name}", *log]
        return "\n".join(text)

    def assert_permitted(self) -> None:
        """No RBAC refusal in any operator pod's log."""
        for pod in self.pods():
            lines = self.logs(pod).splitlines()
            refused = [
                line for line in lines
                if "Not enough permissions" in line or "forbidden" in line.lower()
            ]  # fmt: skip
            assert not refused, "\n".join(refused[:10])

    def metrics(self, pod: Any) -> str:
        """The pod's /metrics, over the pod network (this host routes to the node's bridge)."""
        port = self.values.get("operator", {}).get("metricsPort", 8080)
        url = f"http://{pod.status.pod_ip}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def wait_ready(self, count: int, timeout: float = 120) -> list[Any]:
        wait_until(f"{count} operator pods Ready", lambda: len(self.ready_pods()) == count,
                   timeout, interval=0.5)  # fmt: skip
        return self.ready_pods()


def adopt_crd(kubectl: Any, release: str, namespace: str) -> None:
    """What the chart's README tells users whose CRD came from `kubectl apply -f crds/`: let
    Helm adopt it (its ownership label and annotations), so `helm install` manages it."""
    crd = "crd/finetunejobs.kubetune.io"
    if not kubectl("get", crd, "--ignore-not-found", "-o", "name").strip():
        return
    kubectl("label", "--overwrite", crd, "app.kubernetes.io/managed-by=Helm")
    kubectl("annotate", "--overwrite", crd, f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}")  # fmt: skip
