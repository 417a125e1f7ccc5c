# Two commands on a fresh machine: `make quickstart` and `make test`.
# Everything is installed into .venv with uv; downloads are cached in ~/.cache/uv,
# so only the first run on a machine pays for torch.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export PYTHONDONTWRITEBYTECODE := 1
CHART := charts/kubetune
HELM = $(or $(KUBETUNE_BIN_CACHE),$(HOME)/.cache/kubetune/bin)/$(shell sed -n 's/^K8S_VERSION=//p' tests/cluster/go/versions.env)/helm

.PHONY: venv test lint typecheck unit quickstart crd chart check-crd bench-data cluster-bins images lock clean

venv: $(VENV)/.installed

$(UV):
	python3 -m pip install --user --quiet uv

# The same install script and pinned versions (images/lock/) as the images, plus dev tools.
$(VENV)/.installed: pyproject.toml images/install.sh images/lock/dev.txt | $(UV)
	UV=$(UV) images/install.sh deps $(VENV) images/lock/dev.txt
	UV=$(UV) images/install.sh project $(VENV) . --editable
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks charts
	$(VENV)/bin/ruff format --check src tests benchmarks charts

typecheck: venv
	$(VENV)/bin/mypy

# The test control plane's binaries (kube-apiserver, etcd, kwok, helm, ...), built once per
# machine from their Go modules into ~/.cache/kubetune/bin (about 10 minutes cold).
cluster-bins:
	bash tests/cluster/go/build.sh

# The trainer and operator images as OCI archives in dist/images/, built with buildah from a
# Debian base (no Docker daemon, no registry). Cached: unchanged images take seconds, a source
# change about a minute; the first build about 6 minutes (it installs PyTorch with CUDA).
images:
	images/build.sh

# Re-resolve the pinned dependency sets in images/lock/ after a change to pyproject.toml.
lock:
	images/lock.sh

test: venv lint typecheck cluster-bins images
	$(PY) -m pytest -q --durations=15

# Trains SmolLM2-135M-Instruct on this machine (CPU: a few minutes) and logs what it answered
# before and after; each run gets its own directory under outputs/.
quickstart: venv
	$(VENV)/bin/kubetune validate examples/quickstart.yaml
	$(VENV)/bin/kubetune train examples/quickstart.yaml --output-dir outputs \
	  --run-id quickstart-$$(date +%Y%m%d-%H%M%S)

# Everything generated from the spec and the operator's rules (tests fail when any is stale).
crd: venv
	$(VENV)/bin/kubetune crd --output crds/finetunejob.yaml
	$(VENV)/bin/kubetune crd --output $(CHART)/files/finetunejob.crd.yaml
	$(VENV)/bin/kubetune crd --docs --output docs/spec.md
	$(PY) -m kubetune.controller.rbac > $(CHART)/files/rbac-rules.yaml.tmp
	mv $(CHART)/files/rbac-rules.yaml.tmp $(CHART)/files/rbac-rules.yaml
	$(PY) charts/values_table.py --write

# The chart as a versioned archive: dist/kubetune-<version>.tgz.
chart: cluster-bins
	$(HELM) lint $(CHART)
	$(HELM) package $(CHART) --destination dist

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
