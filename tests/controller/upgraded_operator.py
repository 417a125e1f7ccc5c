"""`kubetune` as a later release would be: the spec gains a defaulted field
(`training.upgradeKnob`, default 7) and an existing default changes (`training.weightDecay`,
0.0 -> 0.1). Run as `python -m tests.controller.upgraded_operator operator ...` by the
upgrade test, next to a CRD that carries the same new field."""

from __future__ import annotations

import sys

from pydantic import Field, create_model

import kubetune.api.spec as spec
from kubetune.cli import main

NEW_FIELD, NEW_DEFAULT = ("upgradeKnob", 7), ("weightDecay", 0.1)


_ORIGINAL = (
    spec.FineTuneJobSpec.model_fields["training"].annotation,
    spec.FineTuneJobSpec.model_fields["training"].default_factory,
)


def upgrade() -> None:
    released = create_model(  # type: ignore[call-overload]
        "TrainingSpec",
        __base__=spec.TrainingSpec,
        upgrade_knob=(int, Field(default=NEW_FIELD[1])),
        weight_decay=(float, Field(default=NEW_DEFAULT[1], ge=0)),
    )
    field = spec.FineTuneJobSpec.model_fields["training"]
    field.annotation, field.default_factory = released, released
    spec.FineTuneJobSpec.model_rebuild(force=True)


def restore() -> None:
    """Back to this release (for tests that upgrade in their own process)."""
    field = spec.FineTuneJobSpec.model_fields["training"]
    field.annotation, field.default_factory = _ORIGINAL
    spec.FineTuneJobSpec.model_rebuild(force=True)


if __name__ == "__main__":
    upgrade()
    sys.exit(main())
