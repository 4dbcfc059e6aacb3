"""Sharded training: every architecture on every mesh trains as on one device; placement; bad meshes.

Runs on the 8 CPU devices that `make test` forces (--xla_force_host_platform_device_count=8).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, tiny_config
from seqmodels import sharding, trainer
from seqmodels.errors import UserError

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]  # (data, fsdp, tensor)
STEPS = 5

# Every architecture, in a training form that runs its scan kernel where it has one, with 8 heads so
# that tensor=8 divides them. "classification" is LION-S under the SequenceClassifier head.
CASES = {
    "mamba": {},
    "dense_mamba": {},
    "gpt": {"model.n_head": 8},
    "gpt2": {"model.n_head": 8},
    "parallel_gpt": {"model.n_head": 8},
    "linear_gpt": {"model.n_head": 8},
    "conv_gpt": {"model.n_head": 8},
    "retnet": {"model.n_head": 8, "model.retention_form": "chunkwise", "model.chunk_size": 8},
    "dense_retnet": {"model.n_head": 8, "model.retention_form": "recurrent"},
    "lion_lit": {"model.n_head": 8},
    "lion_d": {"model.n_head": 8, "model.lion_form": "rnn"},
    "lion_s": {"model.n_head": 8, "model.lion_form": "rnn"},
    "classification": {"model.n_head": 8, "objective": "classification", "num_classes": 3},
}


def _config(case, mesh=(1, 1, 1), **overrides):
  arch = "lion_s" if case == "classification" else case
  sizes = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh))
  return tiny_config(arch, seq_len=16, **CASES[case], **sizes, **overrides)


def _batches(config):
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens = rng.integers(0, 256, (config.batch_size, config.seq_len + 1)).astype(np.int32)
    if config.objective == "classification":
      lengths = rng.integers(config.seq_len // 2, config.seq_len + 1, config.batch_size)
      mask = (np.arange(config.seq_len)[None] < lengths[:, None]).astype(np.int32)
      batches.append({"inputs": tokens[:, :-1] * mask, "mask": mask,
                      "targets": rng.integers(0, config.num_classes, config.batch_size).astype(np.int32)})
    else:
      batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  return batches


def _losses(t, host_state, batches):
  state = jax.device_put(host_state, jax.tree.map(lambda x: x.sharding, t.abstract_state))
  losses = []
  for batch in batches:
    state, metrics = t.train_step(state, sharding.put_batch(batch, t.mesh))
    losses.append(float(metrics["loss"]))
  return losses


@pytest.mark.parametrize("case", CASES)
def test_every_mesh_trains_like_one_device(case):
  reference = trainer.Trainer(_config(case), "unused")
  # One initial state for every mesh (the init is the same computation wherever it runs).
  host_state = jax.device_get(reference.init_state())
  batches = _batches(reference.config)
  expected = _losses(reference, host_state, batches)
  assert len(set(expected)) == STEPS  # The steps really train.
  for mesh in MESHES:
    t = trainer.Trainer(_config(case, mesh), "unused")
    assert t.mesh.devices.shape == mesh
    np.testing.assert_allclose(_losses(t, host_state, batches), expected, rtol=2e-5, atol=2e-5,
                               err_msg=f"{case} on mesh {mesh}")


@pytest.mark.parametrize("case", ["mamba", "gpt", "retnet"])
def test_microbatches_on_a_mesh_train_like_one_device(case):
  """Two microbatches on data-parallel meshes, where each data group sums its own microbatches'
  gradients in a shard_map and the groups' sums meet once (accumulate.py), and on (2, 2, 2), where
  XLA's partitioning alone runs the loop: the losses of the whole batch on one device."""
  reference = trainer.Trainer(_config(case, batch_size=16), "unused")
  host_state = jax.device_get(reference.init_state())
  batches = _batches(reference.config)
  expected = _losses(reference, host_state, batches)
  for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    t = trainer.Trainer(_config(case, mesh, batch_size=16, microbatches=2), "unused")
    # Tighter than the test above: a gradient summed over too few devices (the scan's A and D,
    # whole on every device) moved the fifth loss by 2e-5.
    np.testing.assert_allclose(_losses(t, host_state, batches), expected, rtol=0, atol=5e-6,
                               err_msg=f"{case} on mesh {mesh}")


def _all_reduces(t, batch):
  """(all-reduces in while-loop bodies, all-reduces elsewhere) in the compiled train step."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(t.mesh)),
                          batch)
  hlo = t.train_step.lower(t.abstract_state, abstract).compile().as_text()
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  counts, computation = [0, 0], None
  for line in hlo.splitlines():
    header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      computation = header.group(1)
    elif re.search(r" all-reduce(-start)?\(", line):
      counts[computation not in bodies] += 1
  return tuple(counts)


def test_accumulated_gradients_are_all_reduced_once_a_step():
  """On a data-parallel mesh the gradients of 4 microbatches are all-reduced after the loop, as one
  microbatch's are, not inside it once a microbatch."""
  single = trainer.Trainer(_config("gpt", (8, 1, 1), batch_size=32), "unused")
  batch = _batches(single.config)[0]
  in_loop, outside = _all_reduces(single, batch)
  assert in_loop == 0 and outside > 0
  accumulated = trainer.Trainer(_config("gpt", (8, 1, 1), batch_size=32, microbatches=4), "unused")
  assert _all_reduces(accumulated, batch) == (0, outside)


@pytest.mark.parametrize("mesh, manual", [((8, 1, 1), {"data", "fsdp", "tensor"}), ((2, 4, 1), {"data", "tensor"})])
def test_accumulation_makes_the_mesh_axes_of_size_1_manual(mesh, manual, monkeypatch):
  """Inside accumulation's data-parallel shard_map every axis of size 1 is manual too, so a kernel
  with no axis left to map runs in a wholly manual region: cuDNN's attention, whose custom
  partitioner rejects a partly manual sharding, failed gpt-125m's 2-GPU run without it."""
  seen = []
  run_local = sharding._run_local

  def recording(*args, **kwargs):
    seen.append(set(sharding._manual_axes()))
    return run_local(*args, **kwargs)
  monkeypatch.setattr(sharding, "_run_local", recording)
  t = trainer.Trainer(_config("gpt", mesh, batch_size=32, microbatches=4), "unused")
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(t.mesh)),
                       _batches(t.config)[0])
  t.train_step.lower(t.abstract_state, batch)
  assert seen and all(axes == manual for axes in seen)


def test_parameters_and_optimizer_state_follow_the_rules():
  t = trainer.Trainer(_config("mamba", (2, 2, 2)), "unused")
  params = t.abstract_state["params"]["backbone"]["blocks"][0]["mixer"]
  spec = lambda x: x.sharding.spec  # noqa: E731
  assert spec(params["in_proj"]["kernel"]) == P("fsdp", "tensor")  # (embed, inner)
  assert spec(params["out_proj"]["kernel"]) == P("tensor", "fsdp")  # (inner, embed)
  # No embed dimension: ZeRO-3 splits the largest one that fsdp still divides.
  assert spec(params["A_log"]) == P(("tensor", "fsdp"), None)
  assert spec(t.abstract_state["params"]["embed"]["embedding"]) == P("tensor", "fsdp")  # (vocab, embed)
  adam = t.abstract_state["opt_state"][1][0]
  flat_params = jax.tree.leaves(t.abstract_state["params"])
  for moments in (adam.mu, adam.nu):
    for moment, param in zip(jax.tree.leaves(moments), flat_params, strict=True):
      assert moment.sharding == param.sharding


def test_scan_runs_on_local_blocks():
  """Each device scans its own (batch / 4, d_inner / 2) block on (2, 2, 2): nothing is gathered."""
  t = trainer.Trainer(_config("mamba", (2, 2, 2)), "unused")
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(t.mesh)),
                       _batches(t.config)[0])
  with jax.set_mesh(t.mesh):
    jaxpr = jax.make_jaxpr(t._train_step)(t.abstract_state, batch).jaxpr
  cfg = t.config
  d_inner = cfg.model.expand * cfg.model.d_model
  # The forward scans (one per layer), their arguments in key order: A, B, C, D, dt, dt_bias, x, z.
  forward = [e for e in jaxpr.eqns if e.primitive.name == "shard_map" and len(e.invars) == 8]
  assert len(forward) == cfg.model.n_layer
  for eqn in forward:
    outside = [v.aval.shape for v in eqn.invars]
    inside = [v.aval.shape for v in eqn.params["jaxpr"].invars]
    assert outside[0] == (d_inner, cfg.model.d_state) and inside[0] == (d_inner // 2, cfg.model.d_state)
    assert outside[6] == (cfg.batch_size, cfg.seq_len, d_inner)
    assert inside[6] == (cfg.batch_size // 4, cfg.seq_len, d_inner // 2)


@pytest.mark.parametrize("mesh, overrides, message", [
    ({"data": -1, "fsdp": 3}, {}, "does not divide 8 devices"),
    ({"data": 1, "tensor": 3}, {}, "mesh.tensor=3 does not divide d_inner"),
    ({"data": 1, "tensor": 8}, {"model.architecture": "gpt", "model.n_head": 2}, "does not divide model.n_head=2"),
    ({"data": 4, "fsdp": 1}, {"batch_size": 6}, "batch_size 6 is not divisible by the 4 devices"),
])
def test_impossible_mesh_is_a_one_line_error(tmp_path, mesh, overrides, message):
  arch = overrides.pop("model.architecture", "mamba")
  config = tiny_config(arch, **{f"mesh.{k}": v for k, v in mesh.items()}, **overrides)
  with pytest.raises(UserError, match=message) as error:
    trainer.train(config, str(tmp_path), progress=False)
  assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def _metric_losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved on (2, 2, 2), resumed on (1, 1, 8) and on one device: the losses go on as without a break."""
  def config(mesh):  # Stopped by max_steps short of total_steps, so no validation pass compiles.
    return _config("mamba", mesh, total_steps=100, log_every=1, val_every=100, checkpoint_every=100)
  trainer.train(config((1, 1, 1)), str(tmp_path / "straight"), max_steps=6, progress=False)
  trainer.train(config((2, 2, 2)), str(tmp_path / "sharded"), max_steps=3, progress=False)
  expected = _metric_losses(tmp_path / "straight")
  for mesh in [(1, 1, 8), (1, 1, 1)]:
    workdir = tmp_path / f"resumed_{'x'.join(map(str, mesh))}"
    shutil.copytree(tmp_path / "sharded", workdir)
    result = trainer.train(config(mesh), str(workdir), max_steps=3, progress=False)
    assert result.step == 6
    resumed = _metric_losses(workdir)
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)],
                               rtol=2e-5, err_msg=f"resumed on {mesh}")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 8)])
def test_two_processes_train_like_one(tmp_path, mesh):
  """Two processes of 4 CPU devices each, joined by jax.distributed: on (2, 2, 2) each reads its own
  half of every batch, on (1, 1, 8) both read all of it (a tensor group spans them); either way the
  losses are the one-process losses, and the run saves its sharded checkpoint."""
  steps = ["--config.total_steps=4", "--config.log_every=1", "--config.val_every=100", "--config.checkpoint_every=100"]
  shape = ["--config.model.d_model=32", "--config.model.n_layer=2", "--config.seq_len=16", "--config.batch_size=8"]
  sizes = [f"--config.mesh.{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh)]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/mamba.py:tiny", "--workdir", str(tmp_path / "two"),
       *steps, *shape, *sizes, f"--config.distributed.coordinator_address={address}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
  one = trainer.resolved_config("configs/mamba.py:tiny", [*steps, *shape, "--config.mesh.data=1"])
  trainer.train(one, str(tmp_path / "one"), progress=False)
  expected = _metric_losses(tmp_path / "one")
  got = _metric_losses(tmp_path / "two")
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)], rtol=2e-5)
  assert os.listdir(tmp_path / "two" / "checkpoints" / "4" / "state")
