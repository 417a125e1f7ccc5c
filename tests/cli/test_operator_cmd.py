"""`kubetune operator`'s peering priority: distinct per replica, so kopf never freezes them."""

from __future__ import annotations

import pytest

from kubetune.cli.operator_cmd import peering_priority


def test_replicas_get_distinct_stable_priorities(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"kubetune-7d9f8c6b5-{suffix}" for suffix in ("abcde", "fghij", "klmno", "pqrst")]
    priorities = []
    for name in names:
        monkeypatch.setenv("POD_ID", name)
        priorities.append(peering_priority(None))
        assert peering_priority(None) == priorities[-1]  # stable for the pod's life
    assert len(set(priorities)) == len(names)
    assert all(1 <= p < 2**31 for p in priorities)  # kopf stores it in the peering status


def test_an_explicit_priority_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_ID", "kubetune-abc")
    assert peering_priority(100) == 100
    monkeypatch.delenv("POD_ID")
    assert peering_priority(None) >= 1  # the host name stands in outside a pod
