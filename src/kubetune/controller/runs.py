"""Run identity: which run a FineTuneJob trains, and what that run was started with.

A run is one training of one spec; its id names its output directory, so it must never
move unless the user asked for a new run. The fields of a spec fall into three groups:

    start a new run   model, data, method, training, distributed, volumes,
                      output.claimName / claimTemplate / subPath, the retrain-token annotation
    next run only     evaluation, output.merge / maxShardSize / dtype / keepAdapter
    at once           runPolicy (retries, deadline, suspend, TTL), resources, image, env and
                      envFrom (all but runPolicy reach the pods from the next attempt: a
                      Job's pod template cannot change)

When a run starts, the spec minus the "at once" sections is recorded with it
(`status.currentRun.spec`); every attempt of the run, retries included, is rendered from that
record, never from a later edit. A new run starts only when the user changed the object
(`metadata.generation` moved past the last one observed) and a "start a new run" field now
differs from the record, or the retrain token changed. Both sides are compared with the
running operator's defaults filled in, so an operator upgrade that adds a defaulted field or
changes a default moves nothing: without an edit the record is not even compared.

Run ids hash the training fields as the API server stores them (CRD defaults included, the
operator's Python defaults not), so the same manifest gives the same id again: a GitOps
revert to an earlier spec returns to that run, which resumes from its checkpoints, or, when it
already finished, reports its result without training again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api.spec import FineTuneJobSpec

Obj = dict[str, Any]

APPLY_AT_ONCE = ("runPolicy", "resources", "image", "env", "envFrom")
"""Spec sections read from the live object, never recorded with a run."""
NEXT_RUN_ONLY: dict[str, tuple[str, ...]] = {
    "evaluation": (),  # () = the whole section
    "output": ("merge", "maxShardSize", "dtype", "keepAdapter"),
}
"""Fields recorded with a run that do not start a new one when edited."""


def recorded(spec: Obj) -> Obj:
    """What a run records of the spec: everything but the sections applied at once."""
    return {k: copy.deepcopy(v) for k, v in spec.items() if k not in APPLY_AT_ONCE}


def training_fields(spec: Obj) -> Obj:
    """The fields whose change starts a new run."""
    out = recorded(spec)
    for section, keys in NEXT_RUN_ONLY.items():
        if section not in out:
            continue
        if not keys:
            del out[section]
        else:
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_id(name: str, spec: Obj, retrain_token: str | None = None) -> str:
    """`<name>-<hash>` of the training fields as stored (and the retrain token, if any)."""
    material = json.dumps(training_fields(spec), sort_keys=True)
    if retrain_token:
        material += "\0" + retrain_token
    return f"{name}-{_digest(material)}"


def _with_defaults(spec: Obj) -> Obj:
    """The training fields with this operator's defaults filled in (raw if they no longer
    validate, e.g. a record written before a field was renamed)."""
    try:
        return training_fields(FineTuneJobSpec.model_validate(spec).to_wire())
    except ValidationError:
        return training_fields(spec)


def same_training(before: Obj, after: Obj) -> bool:
    """True when no field that starts a new run differs (defaults compared as filled in)."""
    return training_fields(before) == training_fields(after) or _with_defaults(
        before
    ) == _with_defaults(after)


@dataclass(frozen=True)
class Choice:
    """The run the FineTuneJob trains now."""

    id: str
    spec: Obj
    """What the run records (and every attempt of it is rendered from)."""
    new: bool
    """A run other than the current one (a new run, or a return to an earlier one)."""


def choose(name: str, spec: Obj, generation: int, token: str | None, previous: Obj) -> Choice:
    """Decide the run from the live spec and the previous status (see the module's text)."""
    current = previous.get("currentRun") or {}
    token = token or None  # an empty annotation is no token
    now = recorded(spec)
    if not current.get("id"):
        return Choice(run_id(name, spec, token), now, True)
    snapshot = current.get("spec")
    if snapshot is None:
        # A status written by an operator that kept no record: adopt its run as it is.
        return Choice(str(current["id"]), now, False)
    keep = Choice(str(current["id"]), snapshot, False)
    if (current.get("retrainToken") or None) != token:
        return _new(name, spec, token, current)
    retrain = ((spec.get("runPolicy") or {}).get("retrainOnSpecChange", True)) is not False
    if not retrain or generation == previous.get("observedGeneration"):
        return keep
    if same_training(snapshot, now):
        return keep
    return _new(name, spec, token, current)


def _new(name: str, spec: Obj, token: str | None, current: Obj) -> Choice:
    new_id = run_id(name, spec, token)
    if new_id == current.get("id"):  # e.g. a token set back: same run, fresh record
        return Choice(new_id, recorded(spec), False)
    return Choice(new_id, recorded(spec), True)


def effective_spec(choice: Choice, live: Obj) -> Obj:
    """The spec an attempt is rendered from: the run's record plus the live "at once" parts."""
    spec = copy.deepcopy(choice.spec)
    for section in APPLY_AT_ONCE:
        if section in live:
            spec[section] = copy.deepcopy(live[section])
    return spec


__all__ = [
    "APPLY_AT_ONCE",
    "NEXT_RUN_ONLY",
    "Choice",
    "choose",
    "effective_spec",
    "recorded",
    "run_id",
    "same_training",
    "training_fields",
]
