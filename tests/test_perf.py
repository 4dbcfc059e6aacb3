"""Memory and speed options that must not change the numbers: microbatches, remat, layer scan,
the bf16-logit cross-entropy; and the MFU arithmetic and the benchmark script."""

import functools
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from seqmodels import accumulate, layers, lm, losses, optim, profiling, throughput, trainer
from seqmodels.errors import UserError


def _batch(config, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 250, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_microbatches_give_the_full_batch_update():
  results = {}
  for microbatches in (1, 4):
    config = tiny_config("gpt", microbatches=microbatches, learning_rate=1e-2, warmup_steps=0)
    t = trainer.Trainer(config, "unused")
    state = t.init_state()
    _, _, grads = jax.jit(lambda params, batch: accumulate.loss_and_grads(t._sums, params, batch, microbatches))(
        state["params"], _batch(config))
    state, metrics = t.train_step(state, _batch(config))
    results[microbatches] = jax.device_get((grads, state["params"], metrics))
  (grads_1, params_1, metrics_1), (grads_4, params_4, metrics_4) = results[1], results[4]
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_4), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
  # Adam's first step is lr * g / (|g| + eps): for the few near-zero gradients it turns their
  # summation-order rounding into a visible share of lr.
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4), strict=True):
    np.testing.assert_allclose(b, a, atol=5e-3 * config.learning_rate)


def test_microbatches_must_divide_the_batch():
  with pytest.raises(UserError, match="does not split into 3 microbatches"):
    trainer.Trainer(tiny_config("gpt", microbatches=3), "unused")


def _lm_loss(model_cfg, tokens):
  """The model's mean next-token loss on tokens as a function of its parameters, and the parameters."""
  graphdef, params = nnx.split(lm.build(model_cfg, seed=0))

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(losses.cross_entropy(logits[:, :-1], tokens[:, 1:]))
  return loss, params


def _loss_and_grads(model_cfg, tokens):
  loss, params = _lm_loss(model_cfg, tokens)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, nnx.to_pure_dict(grads)


def _stack_blocks(grads, head=0):
  """The unscanned gradient tree as the scanned layout holds it: the list of blocks stacked, but for
  the first `head` (DenseMamba's first dense_m layers, which stay a list)."""
  blocks = grads["backbone"]["blocks"]
  order = sorted(blocks)
  backbone = {**grads["backbone"], "blocks": jax.tree.map(lambda *xs: np.stack(xs), *(blocks[i] for i in order[head:]))}
  if head:
    backbone["head"] = {i: blocks[i] for i in order[:head]}
  return {**grads, "backbone": backbone}


@pytest.mark.parametrize("arch,options", [
    ("gpt", {"scan_layers": True}),
    ("gpt", {"remat": "save_dots"}),
    ("mamba", {"scan_layers": True, "remat": "block"}),
    ("mamba", {"scan_layers": True, "remat": "save_kernels"}),
    ("retnet", {"remat": "block"}),
    ("lion_lit", {"scan_layers": True, "remat": "save_dots"}),
    ("dense_mamba", {"scan_layers": True, "remat": "block"}),
    ("dense_retnet", {"scan_layers": True}),
])
def test_remat_and_layer_scan_keep_loss_and_gradients(arch, options):
  # The dense models: 2 list layers (the first dense_m or dense_layers) and 3 scanned ones that each
  # read the 2 below.
  dense = {"model.n_layer": 5, f"model.{'dense_m' if arch == 'dense_mamba' else 'dense_layers'}": 2}
  # Mamba with the Pallas scan (interpreted on CPU), whose kernel outputs save_kernels keeps.
  base = dense if arch.startswith("dense") else {"model.scan_impl": "pallas"} if arch == "mamba" else {}
  model_cfg = tiny_config(arch, **base).model
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 250, (2, 24)))
  plain_loss, plain_grads = _loss_and_grads(model_cfg, tokens)
  cfg = model_cfg.copy_and_resolve_references()
  cfg.update(options)
  loss, grads = _loss_and_grads(cfg, tokens)
  head = cfg.get("dense_m", cfg.get("dense_layers", 0))
  expected = _stack_blocks(plain_grads, head) if options.get("scan_layers") else plain_grads
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def _count_primitive(jaxpr, name):
  """How many equations of `jaxpr` and the jaxprs nested in its equations apply primitive `name`."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          count += _count_primitive(getattr(sub, "jaxpr", sub), name)
  return count


def _grad_jaxpr(model_cfg, tokens):
  loss, params = _lm_loss(model_cfg, tokens)
  return jax.make_jaxpr(jax.grad(loss))(params).jaxpr


@pytest.mark.parametrize("fused_inner", [False, True])
def test_save_kernels_reruns_no_kernel(fused_inner, monkeypatch):
  """Under model.remat=save_kernels the backward reads the scan's (and with model.fused_inner the
  conv's) outputs from the forward instead of rerunning their kernels. The step's gradient is
  traced for a GPU, where the kernels are Mosaic GPU calls (`mpmd_map`): a layer's, forward /
  block's rerun / backward, are the scan's 1 / 1 / 1, or fused the conv's and the scan's 2 / 2 / 2.
  (The fused kernels run on CPU only in the Mosaic GPU interpreter, whose callbacks
  jax.checkpoint refuses; the interpreted portable kernels leave their dead reruns to XLA.)"""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 250, (2, 24)))
  calls = {}
  for remat in ("block", "save_kernels"):
    cfg = tiny_config("mamba", **{"model.d_model": 64, "model.scan_impl": "pallas", "model.scan_layers": True,
                                  "model.fused_inner": fused_inner, "model.remat": remat}).model
    calls[remat] = _count_primitive(_grad_jaxpr(cfg, tokens), "mpmd_map")
  assert calls == ({"block": 6, "save_kernels": 4} if fused_inner else {"block": 3, "save_kernels": 2})


@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_pieces_are_the_split_product_with_its_gradients(use_bias):
  linear = layers.linear(6, 10, axes=("embed", "inner"), dtype=jnp.float32, rngs=nnx.Rngs(0), use_bias=use_bias)
  if use_bias:
    linear.bias[...] = jnp.arange(10.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 10)), jnp.float32)
  graphdef, params = nnx.split(linear)

  def loss(pieces_of, params, x):  # A different weight on each output, so every piece's gradient shows.
    return sum((out * w).sum() for out, w in zip(pieces_of(nnx.merge(graphdef, params), x), jnp.split(weights, [4, 7], axis=1)))
  split = lambda lin, x: jnp.split(lin(x), [4, 7], axis=-1)
  pieces = lambda lin, x: layers.linear_pieces(lin, x, (4, 3, 3))
  for a, b in zip(pieces(linear, x), split(linear, x), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  expected = jax.grad(functools.partial(loss, split), argnums=(0, 1))(params, x)
  got = jax.grad(functools.partial(loss, pieces), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt", "dense_mamba", "dense_retnet"])
def test_scanned_layers_decode_like_the_parallel_forward(arch):
  cfg = tiny_config(arch, **({"model.n_layer": 4} if arch.startswith("dense") else {})).model
  cfg.scan_layers = True
  model = lm.build(cfg)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 250, (2, 9)))
  logits, cache = model.prefill(tokens[:, :5], model.init_cache(2, max_length=9))
  steps = []
  for t in range(5, 9):
    step_logits, cache = model.step(tokens[:, t], cache)
    steps.append(step_logits)
  full = model(tokens)
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_stacked_layers_decay_only_matrices():
  cfg = tiny_config("mamba").model
  cfg.scan_layers = True
  mask = optim.weight_decay_mask(nnx.state(lm.abstract(cfg), nnx.Param))
  mixer = mask["backbone"]["blocks"]["mixer"]
  assert mixer["in_proj"]["kernel"] and mixer["out_proj"]["kernel"]
  assert not mixer["conv1d"]["bias"] and not mixer["D"] and not mixer["A_log"] and not mixer["dt_bias"]
  assert not mask["backbone"]["blocks"]["norm"]["scale"]


@pytest.mark.parametrize("arch", ["parallel_gpt", "conv_gpt"])
def test_unscannable_architectures_are_refused(arch):
  cfg = tiny_config(arch).model
  cfg.scan_layers = True
  with pytest.raises(UserError, match="cannot scan its layers"):
    lm.check_config(cfg)


def test_unknown_remat_policy_is_refused():
  cfg = tiny_config("mamba").model
  cfg.remat = "everything"
  with pytest.raises(UserError, match="model.remat must be one of none, block, save_dots, save_kernels"):
    lm.check_config(cfg)


@pytest.mark.parametrize("setting,scan_layers,graphs", [
    ("auto", False, False), ("auto", True, True), ("on", False, True), ("off", True, False)])
def test_command_buffers_setting_picks_the_xla_option(setting, scan_layers, graphs):
  config = tiny_config("gpt", command_buffers=setting, **{"model.scan_layers": scan_layers})
  assert trainer.step_compiler_options(config) == ({} if graphs else {"xla_gpu_enable_command_buffer": ""})


def test_unknown_command_buffers_setting_is_refused():
  with pytest.raises(UserError, match="command_buffers must be auto, on or off, got 'sometimes'"):
    trainer.Trainer(tiny_config("gpt", command_buffers="sometimes"), "unused")


def test_step_compiler_options_reach_xla(monkeypatch):
  config = tiny_config("gpt")
  state = trainer.Trainer(config, "unused").init_state()
  monkeypatch.setattr(trainer, "step_compiler_options", lambda config: {"xla_no_such_option": 1})
  t = trainer.Trainer(config, "unused")
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_no_such_option'"):
    t.train_step(state, _batch(config))
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_no_such_option'"):
    t.eval_step(state["params"], _batch(config))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_matches_a_float64_reference(dtype):
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 5, 37)) * 4, dtype)
  targets = jnp.asarray(rng.integers(0, 37, (3, 5)))
  weights = rng.uniform(size=(3, 5))
  wide = np.asarray(logits.astype(jnp.float32), np.float64)
  log_probs = wide - np.log(np.sum(np.exp(wide - wide.max(-1, keepdims=True)), -1, keepdims=True)) \
      - wide.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
  grad = weights[..., None] * (np.exp(log_probs) - np.eye(37)[np.asarray(targets)])

  loss, dlogits = jax.value_and_grad(lambda x: jnp.sum(losses.cross_entropy(x, targets) * weights))(logits)
  assert dlogits.dtype == dtype
  np.testing.assert_allclose(loss, np.sum(nll * weights), rtol=1e-6)
  tolerance = 1e-6 if dtype == jnp.float32 else 4e-3  # The gradient is rounded to the logits' dtype.
  np.testing.assert_allclose(np.asarray(dlogits, np.float64), grad, atol=tolerance)


def test_mfu_formula_and_peak_table():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert throughput.peak_flops(Device) == 989e12
  Device.device_kind = "NVIDIA H100 PCIe"
  assert throughput.peak_flops(Device) == 756e12
  Device.device_kind = "cpu"
  assert throughput.mfu(1e5, 1e9, Device) is None
  Device.device_kind = "NVIDIA H200"
  assert throughput.mfu(100_000, 1.978e9, Device) == pytest.approx(0.2)
  # flops_per_token is 6 x matmul params + the blocks' extra work (here attention's 6 L d per layer).
  cfg = tiny_config("gpt").model
  model = lm.abstract(cfg)
  assert lm.flops_per_token(model, 128) == 6 * lm.matmul_params(model) + cfg.n_layer * 6 * 128 * cfg.d_model


def test_profile_summary_groups_device_ops():
  # A fusion carries its root op's name stack; the scan op inside it decides its category.
  hlo = ('%fused_concatenate.7 (param_0: f32[8]) -> f32[16] {\n'
         '  %param_0 = f32[8] parameter(0)\n'
         '  %mul.1 = f32[8] multiply(%param_0, %param_0), '
         'metadata={op_name="jit(_train_step)/transpose(jvp(scan))/mul"}\n'
         '  ROOT %concatenate.1 = f32[16] concatenate(%mul.1, %param_0), '
         'metadata={op_name="jit(_train_step)/concatenate"}\n'
         '}\n\n'
         'ENTRY %main.9 (p: f32[8]) -> f32[16] {\n'
         '  %input_concatenate_fusion.7 = f32[16] fusion(f32[8] %p), kind=kInput, calls=%fused_concatenate.7, '
         'metadata={op_name="jit(_train_step)/concatenate"}\n'
         '  %custom-call.2 = bf16[8,8] custom-call(), metadata={op_name="jit(_train_step)/dot_general"}\n'
         '}\n')
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "input_concatenate_fusion_7", "dur": 3000.0,
             "args": {"hlo_op": "command_buffer_1"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_gemm_bf16", "dur": 1000.0, "args": {"hlo_op": "custom-call.2"}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "cudnn_generated_fort_native_sdpa", "dur": 500.0, "args": {}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "selective_scan_forward_mosaic_gpu_kernel", "dur": 2000.0,
             "args": {}},
            {"ph": "X", "pid": 1, "tid": 7, "name": "Memcpy DtoD", "dur": 0.0, "args": {}},
            # Lines derived from the kernels, beside the streams that ran them, do not count.
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "X", "pid": 1, "tid": 2, "name": "fusion.3", "dur": 4500.0, "args": {}},
            {"ph": "X", "pid": 2, "name": "host work", "dur": 9000.0, "args": {}}]
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"trace_{os.getpid()}.json.gz")
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  ops = profiling.device_ops(path, hlo)
  summary = profiling.summarize(ops, steps=1)
  timeline = path + ".tsv"
  profiling.write_timeline(ops, timeline)
  os.remove(path)
  rows = [line.split("\t") for line in open(timeline).read().splitlines()]
  os.remove(timeline)
  # Every device op of the stream, one a line; the derived "XLA Ops" line and host work are not.
  assert [row[3] for row in rows[1:]] == ["input_concatenate_fusion_7", "sm90_xmma_gemm_bf16",
                                          "cudnn_generated_fort_native_sdpa",
                                          "selective_scan_forward_mosaic_gpu_kernel", "Memcpy DtoD"]
  assert rows[1][1:3] == ["3000.000", "scan"]
  assert rows[4][2] == "scan"  # A Pallas kernel has no HLO op, hence no scope: its name says it.
  assert summary["ms_by_category"] == {"scan": 5.0, "matmul": 1.0, "attention": 0.5, "other": 0.0}
  assert summary["top_ops"][0] == {"name": "input_concatenate_fusion_7", "category": "scan", "ms": 3.0, "count": 1,
                                   "scope": "jit(_train_step)/concatenate jit(_train_step)/transpose(jvp(scan))/mul "
                                            "jit(_train_step)/concatenate"}
  assert summary["kernels_per_step"] == 4  # The copy is a device op but not a kernel.


def test_bench_train_times_the_train_step(tmp_path):
  out = tmp_path / "bench.jsonl"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--config", "configs/gpt.py:tiny",
       "--config", "configs/mamba.py:tiny --config.model.scan_layers=true", "--steps", "2", "--warmup", "1",
       "--json", str(out), "--config.model.n_layer=1", "--config.model.d_model=32", "--config.seq_len=16",
       "--config.batch_size=4", "--config.mesh.data=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in open(out)]
  assert [r["config"] for r in rows] == ["configs/gpt.py:tiny", "configs/mamba.py:tiny --config.model.scan_layers=true"]
  for r in rows:
    assert r["tokens_per_sec_per_device"] == pytest.approx(4 * 16 / (r["step_ms"] / 1e3))
    assert r["pipelined_tokens_per_sec_per_device"] > 0
    assert np.isfinite(r["final_loss"]) and r["peak_gb"] > 0 and r["mfu"] is None  # No CPU peak rate.
  assert "tok/s/dev" in proc.stdout and "pipelined" in proc.stdout and "configs/mamba.py:tiny" in proc.stdout
