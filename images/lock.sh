#!/usr/bin/env bash
# Resolves the pinned dependency sets that the images and the dev environment install:
#   images/lock.sh                 re-resolve, keeping every pin that still satisfies pyproject.toml
#   images/lock.sh --upgrade       move every pin to the newest allowed version
# dev.txt (all extras, for `make venv` on any platform: a universal lock with markers) is
# resolved first; the images' trainer.txt and operator.txt (Linux x86_64) are constrained by
# it, so the images run exactly the versions that `make test` tested. CPython 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=$(command -v uv || echo "$HOME/.local/bin/uv")
compile() {  # output extras... (extra arguments pass through)
  local out="images/lock/$1.txt"; shift
  "$uv" pip compile --quiet pyproject.toml --python-version 3.11 \
    --custom-compile-command "images/lock.sh" --output-file "$out" "$@"
}
image=(--python-platform x86_64-manylinux_2_28 --constraint images/lock/dev.txt)
compile dev --universal --extra trainer --extra operator --extra dev "$@"
compile trainer --extra trainer "${image[@]}"
compile operator --extra operator "${image[@]}"
