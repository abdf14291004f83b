# The two front-door commands: `make demo` and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint extended-test cluster-test elastic-test disk-test gpu-preflight

# Re-installs whenever requirements.txt changes.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m workflows demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Not part of `make test`, to keep it within CI's ~25 minutes: the end-to-end checks marked `extended`, whose cases
# another test in `make test` mostly covers: a Tune sweep with ASHA on s3 storage, the S3 endpoint gone in the middle
# of a checkpoint upload, a SIGKILLed worker on local storage (~4 min on 2 cores; tests/conftest.py).
extended-test: $(STAMP)
	DIST_EXTENDED=1 $(PY) -m pytest -m extended

# Not part of `make test`: `ray up cluster/local.yaml` for real against three namespace-hosts on this machine (root;
# 5-22 minutes on 2 cores, see cluster/README.md). DIST_CLUSTER_LAUNCH=1 lets pytest collect tests/cluster_launch.
cluster-test: $(STAMP)
	DIST_CLUSTER_LAUNCH=1 $(PY) -m pytest -s tests/cluster_launch

# Not part of `make test`: an elastic pre-training run on a head plus worker raylets through a drain notice, a node
# added back and a raylet killed without notice, and one with a node left out (~10 min on 2 cores; docs/training.md,
# "Elastic runs").
elastic-test: $(STAMP)
	DIST_ELASTIC_CLUSTER=1 $(PY) -m pytest tests/workflows/test_elastic_cluster.py

# Not part of `make test`: real disk faults, made with tmpfs mounts in private mount namespaces (root): full disks
# under a pre-training run and a Tune sweep, each resumed once space is freed, and a Ray node that does not see the
# shared disk the head sees, and one that loses it in the middle of a run (~9 min on 2 cores; docs/training.md,
# docs/data.md).
disk-test: $(STAMP)
	DIST_DISK_FAULTS=1 $(PY) -m pytest tests/workflows/test_full_disk.py tests/workflows/test_blind_node.py \
		tests/workflows/test_node_loses_disk.py

# Not part of `make test`: before device time is spent, rehearse a lent GPU machine's run here: its Python 3.12 and
# torch 2.11 (in .venv-gpu, ~5 GB), the .gpu/ bundle it carries, the compile tests and gpu_checks.sh targets' logic
# under them (~4 min after the venv; PREFLIGHT=pretrain, ~10 min, adds the workflows' bundle and a CPU smoke
# run). benchmarks/README.md
PREFLIGHT ?= targets
gpu-preflight: $(STAMP)
	bash benchmarks/gpu_preflight.sh $(PREFLIGHT)
