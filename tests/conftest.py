"""Shared fixtures: tiny configs that build and train in seconds on a CPU."""

import os
import sys

# The sharding tests need 8 host devices, and with one the Mosaic GPU interpreter's warpgroup threads
# can deadlock at a barrier when two test processes share the CPU (seen in session 6). `make test`
# sets the same flag; this covers a bare pytest. It must precede jax's first use.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from seqmodels import config as config_lib  # noqa: E402

# Numerics tests compare against float32/float64 references; on GPU the default matmul precision
# (TF32) would need tolerances that hide real bugs.
jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(arch: str = "mamba", **overrides):
  """The shipped tiny variant, shrunk further so a test step takes milliseconds."""
  config = config_lib.load(os.path.join(REPO, "configs", f"{arch}.py") + ":tiny")
  config.model.n_layer = 2
  config.model.d_model = 32
  if arch == "gpt":
    config.model.n_head = 2
  config.seq_len = 32
  config.batch_size = 8
  config.total_steps = 8
  config.warmup_steps = 2
  config.log_every = 2
  config.val_every = 4
  config.val_batches = 2
  config.checkpoint_every = 4
  config.mesh.data = 1  # One device: the sharding tests ask for more explicitly.
  for key, value in overrides.items():
    parent = config
    *path, name = key.split(".")
    for part in path:
      parent = parent[part]
    parent[name] = value
  return config


@pytest.fixture
def repo():
  return REPO
