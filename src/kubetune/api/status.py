"""The FineTuneJob status, written only by the operator (through the status subresource)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.base import FreeForm, KubeModel

Phase = Literal["Pending", "Queued", "Running", "Merging", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[Phase, ...] = (
    "Pending",
    "Queued",
    "Running",
    "Merging",
    "Succeeded",
    "Failed",
    "Suspended",
)
MAX_RUN_HISTORY = 20


class Condition(KubeModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str
    observed_generation: int | None = None


class CurrentRun(KubeModel):
    """The run in progress (or the last one)."""

    id: str
    """Run id; outputs go to `<subPath>/<id>`."""
    attempt: int = 1
    """Attempt number (each retry resumes from the newest checkpoint)."""
    disruptions: int | None = None
    """Times an attempt was recreated whole after a disruption (not counted as retries)."""
    disrupted_job: str | None = None
    """UID of the Job last stopped for a disruption (each is counted once)."""
    generation: int | None = None
    """The metadata.generation this run trains."""
    started_at: str | None = None
    step: int | None = None
    total_steps: int | None = None
    progress: str | None = None
    """`step/total` for the printer column."""
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta: str | None = None
    """Estimated time left, e.g. `1h02m`."""
    retrain_token: str | None = None
    """The `kubetune.io/retrain-token` annotation this run was started with."""
    spec: FreeForm | None = None
    """The spec this run was started with, less runPolicy, resources and image (which apply
    at once); every attempt of the run is rendered from it."""


class Outputs(KubeModel):
    """Paths (within the output volume) of a successful run's models."""

    adapter: str | None = None
    merged: str | None = None


class RunRecord(KubeModel):
    """A finished (or abandoned) run."""

    id: str
    generation: int | None = None
    phase: str
    started_at: str | None = None
    finished_at: str | None = None
    output_path: str | None = None
    final_loss: float | None = None
    outputs: Outputs | None = None


class FineTuneJobStatus(KubeModel):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    current_run: CurrentRun | None = None
    runs: list[RunRecord] = Field(default_factory=list, max_length=MAX_RUN_HISTORY)
    outputs: Outputs | None = None
    """The latest successful run's models."""
    message: str | None = None
