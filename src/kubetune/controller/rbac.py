"""The operator's permissions: exactly what it (and kopf under it) calls, nothing more.

One source of truth (the Helm chart, when it comes, renders or checks against these rules).
The operator tests run under a ServiceAccount bound to them (cluster-wide, or one Role per
watched namespace) on an API server that enforces OwnerReferencesPermissionEnforcement, so a
missing rule fails a test.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import GROUP, PLURAL

Rule = dict[str, list[str]]

NAMESPACED_RULES: list[Rule] = [
    # Watch FineTuneJobs; get: is a 422 on the status a namesake's? patch: kopf removes an
    # earlier version's finalizer; delete: TTL.
    {
        "apiGroups": [GROUP],
        "resources": [PLURAL],
        "verbs": ["get", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # Children carry blockOwnerDeletion, which OwnerReferencesPermissionEnforcement allows
    # only to those who may update the owner's finalizers.
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # get: a 409's owner check; patch: suspend, adopting an orphan; delete: other runs' Jobs.
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {
        "apiGroups": [""],
        "resources": ["services", "configmaps"],
        "verbs": ["get", "list", "create", "patch", "delete"],
    },
    # Never get, patch or delete: outputs are not the operator's to touch.
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
"""Rules on the FineTuneJobs' namespaces: a ClusterRole cluster-wide, a Role per namespace
when the operator watches some namespaces only."""

CLUSTER_RULES: list[Rule] = [
    # kopf notices the CRD being installed, upgraded or removed while it runs.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
"""Rules that are cluster-wide in any mode."""

NAMESPACE_WATCH_RULES: list[Rule] = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]
"""With `--namespace`: kopf lists and watches namespaces to match the names (and globs);
without the rule it only warns and takes the names as given."""

PEERING_RULES: dict[bool, list[Rule]] = {
    # kopf's peering (--peering): it watches the peering object and patches its own entry.
    False: [{"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
             "verbs": ["get", "list", "watch", "patch"]}],
    True: [{"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"]}],
}  # fmt: skip
"""By mode (namespaced: True): only with `--peering`, for several replicas."""


def cluster_role(name: str, namespaced_mode: bool = False, peering: bool = False) -> dict[str, Any]:
    """The ClusterRole: everything cluster-wide, or only the cluster rules when the operator
    watches some namespaces (their rules then go into `role`)."""
    rules = CLUSTER_RULES + (NAMESPACE_WATCH_RULES if namespaced_mode else NAMESPACED_RULES)
    if peering and not namespaced_mode:
        rules = rules + PEERING_RULES[False]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(rule) for rule in rules],
    }


def role(name: str, namespace: str, peering: bool = False) -> dict[str, Any]:
    rules = NAMESPACED_RULES + (PEERING_RULES[True] if peering else [])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": [dict(rule) for rule in rules],
    }
