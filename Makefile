# Two commands do all the set-up (see README.md):
#   make train   builds .venv if needed, then trains the tiny Mamba on the embedded corpus
#   make test    builds .venv if needed, then runs the test suite
# Both refresh .venv whenever pyproject.toml changes.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/mamba_tiny
CONFIG ?= configs/mamba.py:tiny
PYTEST_ARGS ?=

.PHONY: venv train test clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py --config $(CONFIG) --workdir $(WORKDIR)

test: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(PY) -m pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
