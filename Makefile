# Two commands on a fresh machine: `make quickstart` and `make test`.
# Everything is installed into .venv with uv; downloads are cached in ~/.cache/uv,
# so only the first run on a machine pays for torch.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test lint typecheck unit quickstart crd check-crd bench-data cluster-bins clean

venv: $(VENV)/.installed

$(UV):
	python3 -m pip install --user --quiet uv

# The same install script the trainer image runs, with the operator and dev extras added.
$(VENV)/.installed: pyproject.toml trainer-image/install.sh | $(UV)
	trainer-image/install.sh $(VENV) trainer,operator,dev
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

# The test control plane's binaries (kube-apiserver, etcd, kwok, helm, ...), built once per
# machine from their Go modules into ~/.cache/kubetune/bin (about 10 minutes cold).
cluster-bins:
	bash tests/cluster/go/build.sh

test: venv lint typecheck cluster-bins
	$(PY) -m pytest -q --durations=15

# Trains SmolLM2-135M-Instruct on this machine (CPU: a few minutes) and logs what it answered
# before and after; each run gets its own directory under outputs/.
quickstart: venv
	$(VENV)/bin/kubetune validate examples/quickstart.yaml
	$(VENV)/bin/kubetune train examples/quickstart.yaml --output-dir outputs \
	  --run-id quickstart-$$(date +%Y%m%d-%H%M%S)

crd: venv
	$(VENV)/bin/kubetune crd --output crds/finetunejob.yaml
	$(VENV)/bin/kubetune crd --docs --output docs/spec.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
