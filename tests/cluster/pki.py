"""Certificates, the service-account key and kubeconfigs for the test control plane.

Made with the ``openssl`` CLI (Debian's, present on every machine of this project) so the test
suite needs no extra Python dependency. Everything is throw-away: a new CA per cluster start.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "3"
# Subjects of the client identities. The components get the names that the apiserver's
# bootstrap RBAC policy grants their permissions to, so RBAC is real for them too.
ADMIN = "/O=system:masters/CN=kubetune-test-admin"
CONTROLLER_MANAGER = "/CN=system:kube-controller-manager"
SCHEDULER = "/CN=system:kube-scheduler"
# Bound to the bootstrap ClusterRole system:kubelet-api-admin when a real node starts.
KUBELET_CLIENT = "/CN=kube-apiserver-kubelet-client"


def node_subject(node: str) -> str:
    """A kubelet's identity, as the Node authorizer and NodeRestriction expect it."""
    return f"/O=system:nodes/CN=system:node:{node}"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path) -> KeyPair:
    ca = KeyPair(d / "ca.crt", d / "ca.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
        "-keyout", str(ca.key), "-out", str(ca.cert), "-subj", "/CN=kubetune-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    return ca


def issue(ca: KeyPair, d: Path, name: str, subject: str, server_sans: list[str] | None) -> KeyPair:
    """Sign a leaf certificate: a server cert when ``server_sans`` is given, else a client."""
    pair = KeyPair(d / f"{name}.crt", d / f"{name}.key")
    csr = d / f"{name}.csr"
    ext = d / f"{name}.ext"
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(pair.key), "-out", str(csr), "-subj", subject,
    )  # fmt: skip
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
    ]
    if server_sans is not None:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=" + ",".join(server_sans)]
    else:
        lines.append("extendedKeyUsage=clientAuth")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", DAYS, "-out", str(pair.cert), "-extfile", str(ext),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return pair


def make_sa_key(d: Path) -> KeyPair:
    """The service-account token signing key (the 'cert' is the public key PEM)."""
    pair = KeyPair(d / "sa.pub", d / "sa.key")
    _openssl("genrsa", "-out", str(pair.key), "2048")
    _openssl("rsa", "-in", str(pair.key), "-pubout", "-out", str(pair.cert))
    return pair


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    """A kubeconfig (JSON is valid YAML) with file references to the certificates."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-test",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
            }
        ],
        "contexts": [
            {"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": user}}
        ],
        "current-context": "kubetune-test",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
