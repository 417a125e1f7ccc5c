"""kube-proxy for the real node: Services' ClusterIPs work from pods, as on any cluster.

Built from the same Kubernetes module as the kubelet (go/build.sh), run as a host process in
iptables mode under the identity the bootstrap RBAC policy names (system:kube-proxy). What it
makes reachable first of all is the `kubernetes` Service: a pod's in-cluster login
(KUBERNETES_SERVICE_HOST, the ServiceAccount token) goes through it to the apiserver, which
advertises the node's address for that reason (controlplane.py).

Its chains are removed at stop with the kubelet's (hoststate.remove_kube_iptables; not
``kube-proxy --cleanup``, which also flushes the host's IPVS and nftables), and
``RealNode.leftovers`` checks they are gone.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import pki
from tests.cluster.controlplane import NODE_IP, ControlPlane, bin_dir
from tests.cluster.procs import LOOPBACK, ManagedProcess, free_port, wait_until

KUBE_PROXY_SUBJECT = "/CN=system:kube-proxy"  # bound to system:node-proxier by bootstrap RBAC


def write_config(control_plane: ControlPlane, work_dir: Path, node: str, pod_cidr: str) -> Path:
    """The KubeProxyConfiguration; nothing in it touches host settings a test host keeps."""
    work_dir.mkdir(parents=True, exist_ok=True)
    identity = pki.issue(control_plane.ca, work_dir, "kube-proxy", KUBE_PROXY_SUBJECT, None)
    kubeconfig = pki.write_kubeconfig(
        work_dir / "kube-proxy.kubeconfig",
        control_plane.server,
        control_plane.ca.cert,
        identity,
        "kube-proxy",
    )
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node,
        "mode": "iptables",
        "clusterCIDR": pod_cidr,
        "healthzBindAddress": f"{LOOPBACK}:{free_port()}",
        "metricsBindAddress": f"{LOOPBACK}:{free_port()}",
        # Leave the host's conntrack table size and route_localnet as they are: no NodePort
        # on 127.0.0.1 is needed, and a test must not retune the machine's kernel.
        "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
        # NodePorts on the node's address only, not on every address of this host.
        "nodePortAddresses": [f"{NODE_IP}/32"],
    }
    path = work_dir / "kube-proxy.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def wait_serving(proc: ManagedProcess, config: Path, timeout: float) -> None:
    """Healthy means it has synced the Services and written its rules at least once."""
    import urllib.request

    address = json.loads(config.read_text())["healthzBindAddress"]

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://{address}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    wait_until("kube-proxy /healthz", healthy, timeout, interval=0.5, alive=proc.exit_reason)


def argv(config: Path) -> list[str]:
    return [str(bin_dir() / "kube-proxy"), f"--config={config}", "--v=1"]
