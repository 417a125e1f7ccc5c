"""The operator under least privilege in tests: a ServiceAccount bound to exactly
`kubetune.controller.rbac`'s rules, and a kubeconfig that logs in with its token."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client

from kubetune.controller import rbac


def _apply(create: Any, *args: Any) -> None:
    try:
        create(*args)
    except client.ApiException as err:
        if err.status != 409:
            raise


def service_account_kubeconfig(
    api: client.ApiClient, admin_kubeconfig: Path, namespaces: list[str] | None, out: Path
) -> Path:
    """A ServiceAccount bound to the operator's rules (one Role per namespace in
    `namespaces`, or a ClusterRole for all namespaces when None); returns a kubeconfig
    logging in as it. The SA lives in the first namespace (or `default`)."""
    core, authz = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    home = namespaces[0] if namespaces else "default"
    name = f"kubetune-operator-{uuid.uuid4().hex[:6]}"
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": home}]
    _apply(core.create_namespaced_service_account, home, {"metadata": {"name": name}})
    _apply(authz.create_cluster_role, rbac.cluster_role(name, namespaced_mode=bool(namespaces)))
    _apply(
        authz.create_cluster_role_binding,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": name},
            "subjects": subject,
        },
    )  # fmt: skip
    for namespace in namespaces or []:
        _apply(authz.create_namespaced_role, namespace, rbac.role(name, namespace))
        _apply(
            authz.create_namespaced_role_binding,
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": name},
                "subjects": subject,
            },
        )  # fmt: skip
    request = {"spec": {"expirationSeconds": 4 * 3600}}
    token = core.create_namespaced_service_account_token(name, home, request).status.token
    admin = json.loads(admin_kubeconfig.read_text())
    config = {
        **admin,
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"],
                                                 "user": name}}],
        "current-context": "sa",
    }  # fmt: skip
    out.write_text(json.dumps(config, indent=2) + "\n")
    return out
