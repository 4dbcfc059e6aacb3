"""kernels/decode_matmul.py: the few-row GEMM in Pallas's Mosaic GPU interpreter against float64
products, its routing from decoding's Linear modules, and its lowering for CUDA at Mamba's sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import mosaic_gpu as plgpu

from conftest import tiny_config
from kernels import decode_matmul
from seqmodels import generate, lm


def _relative_error(out, x, w):
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("rows, k, n, tiling", [
    (5, 256, 96, dict(parts=2, tile_k=64)),  # padded rows, 32-column blocks, float32 partial sums
    (130, 256, 128, dict(parts=1, stages=2)),  # three row tiles, the output written in bf16
])
def test_interpreted_kernel_matches_float64(rows, k, n, tiling):
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.bfloat16)
  out = decode_matmul.matmul(x, w, interpret=plgpu.InterpretGPUParams(), **tiling)
  assert out.shape == (rows, n) and out.dtype == jnp.bfloat16
  assert _relative_error(out, x, w) < 5e-3  # bf16 rounding of the output, float32 sums


def test_tiling_defaults_fill_the_gpu_and_refuse_what_does_not_tile():
  # mamba-370m at batch 64: in_proj 64 blocks of columns over all of k; out_proj 16 x 8 parts of
  # k, x_proj 3 x 16; 256 rows take k in blocks of 64 so that 3 stages fit.
  tilings = [(decode_matmul.column_tile(n), decode_matmul.depth_tile(k, rows)) for rows, k, n in
             [(64, 1024, 4096), (64, 2048, 1024), (64, 2048, 96), (256, 1024, 4096)]]
  assert tilings == [(64, 128), (64, 128), (32, 128), (64, 64)]
  assert [decode_matmul.split_parts(n, k, tile_n, tile_k) for (tile_n, tile_k), (k, n) in
          zip(tilings, [(1024, 4096), (2048, 1024), (2048, 96), (1024, 4096)])] == [1, 8, 16, 1]
  assert decode_matmul._stages_that_fit(64, 64, 128, jnp.bfloat16) == decode_matmul.STAGES
  assert decode_matmul._stages_that_fit(256, 64, 64, jnp.bfloat16) == 3  # 3 x 40 KB + the 64 KB output
  with pytest.raises(ValueError, match="multiple of tile_n"):
    decode_matmul.matmul(jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((128, 80), jnp.bfloat16), tile_n=32)


def _route_to_interpreter(monkeypatch):
  """Makes dot_general take the kernel path on CPU, interpreted; returns the list of its calls."""
  calls = []
  interpreted = functools.partial(decode_matmul.matmul, interpret=plgpu.InterpretGPUParams())

  def counted(x, w):
    calls.append((x.shape, w.shape))
    return interpreted(x, w)
  monkeypatch.setattr(decode_matmul, "_on_gpu", lambda: True)
  monkeypatch.setattr(decode_matmul, "matmul", counted)
  return calls


def test_dot_general_routes_few_bf16_rows_and_falls_back_otherwise(monkeypatch):
  calls = _route_to_interpreter(monkeypatch)
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(128, 64)), jnp.bfloat16)
  contract_last = (((1,), (0,)), ((), ()))
  x = jnp.asarray(rng.normal(size=(3, 128)), jnp.bfloat16)
  assert _relative_error(decode_matmul.dot_general(x, w, contract_last), x, w) < 5e-3
  assert calls == [((3, 128), (128, 64))]
  many_rows = jnp.asarray(rng.normal(size=(decode_matmul.MAX_ROWS + 1, 128)), jnp.bfloat16)
  for lhs, rhs in [(many_rows, w), (x.astype(jnp.float32), w.astype(jnp.float32)), (x[:, :96], w[:96])]:
    np.testing.assert_array_equal(decode_matmul.dot_general(lhs, rhs, contract_last),
                                  jax.lax.dot_general(lhs, rhs, contract_last))
  monkeypatch.setattr(decode_matmul, "ENABLED", False)
  decode_matmul.dot_general(x, w, contract_last)
  assert len(calls) == 1


@pytest.mark.parametrize("arch, every_model, kernel_products_per_layer", [
    # in_proj's two pieces (layers.linear_pieces; a GPU's fused decoding step makes it one product)
    # and out_proj; x_proj (rank 4 + 2 x 16 = 36 columns) falls back.
    ("mamba", False, 3),
    ("gpt", False, 0),  # Transformers keep XLA's GEMMs (slower decoding with the kernel, NOTES.md)
    ("gpt", True, 5),  # unless EVERY_MODEL: qkv, out, gate, up, down
])
def test_a_decoding_step_through_the_kernel_matches_xla(arch, every_model, kernel_products_per_layer,
                                                         monkeypatch):
  """A bf16 decoding step of a tiny model (width 64, so its projections tile) with the Linear
  products the backbone routes in the interpreted kernel, against the same step with XLA's."""
  monkeypatch.setattr(decode_matmul, "EVERY_MODEL", every_model)
  cfg = tiny_config(arch, **{"model.d_model": 64, "model.dtype": "bfloat16"}).model
  model = generate.inference_model(lm.build(cfg, seed=0))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray([3, 17], jnp.int32)
  cache = model.init_cache(2, 8)
  step = lambda: jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))(params, tokens, cache)[0]  # noqa: E731
  want = step()
  calls = _route_to_interpreter(monkeypatch)
  got = step()
  assert len(calls) == kernel_products_per_layer * cfg.n_layer
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < 2e-2, err


def test_kernel_lowers_for_cuda_at_mamba_370m_decode_shapes():
  for rows, k, n in [(64, 1024, 4096), (64, 2048, 96), (64, 2048, 1024), (256, 1024, 2816)]:
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    text = jax.jit(decode_matmul.matmul).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_conv_product_in_the_interpreter_matches_float64():
  """in_proj, the conv and x_proj of one token as one kernel: xz, u = silu(conv) over the window
  (the conv state's rows, then xz's first d columns), and x_proj_sum + u @ x_proj_w."""
  rng = np.random.default_rng(1)
  rows, k, d, width, m = 64, 256, 128, 4, 96
  x = jnp.asarray(rng.normal(size=(rows, k)) / 8, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, 2 * d)) / 4, jnp.bfloat16)
  state = jnp.asarray(rng.normal(size=(rows, width - 1, d)), jnp.bfloat16)
  conv_kernel = jnp.asarray(rng.normal(size=(width, d)), jnp.float32)
  conv_bias = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
  x_proj_w = jnp.asarray(rng.normal(size=(d, m)) / 8, jnp.bfloat16)
  x_proj_sum = jnp.asarray(rng.normal(size=(rows, m)), jnp.float32)
  xz, u, total = decode_matmul.conv_product(x, w, state, conv_kernel, conv_bias, x_proj_w, x_proj_sum,
                                            interpret=plgpu.InterpretGPUParams())
  assert _relative_error(xz, x, w) < 5e-3
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  window = np.concatenate([f64(state), f64(xz)[:, None, :d]], axis=1)
  rounded = lambda a: f64(jnp.asarray(a, jnp.bfloat16))  # noqa: E731  the conv module's bf16 weights
  pre = rounded(conv_bias) + np.einsum("bkc,kc->bc", window, rounded(conv_kernel))
  want = pre / (1 + np.exp(-pre))
  assert u.shape == (rows, d) and u.dtype == jnp.bfloat16
  assert np.linalg.norm(f64(u) - want) / np.linalg.norm(want) < 5e-3
  want_total = f64(x_proj_sum) + f64(u) @ f64(x_proj_w)  # from u as stored: float32 sums of bf16 products
  assert total.dtype == jnp.float32 and np.abs(f64(total) - want_total).max() < 1e-4 * np.abs(want_total).max()
  assert decode_matmul.conv_product_fits(64, 1024, 2048, 4, 96, jnp.bfloat16)  # mamba-370m at batch 64
  assert not decode_matmul.conv_product_fits(128, 1024, 2048, 4, 96, jnp.bfloat16)  # one stage would fit
  with pytest.raises(ValueError, match="multiple of 64"):
    decode_matmul.conv_product(x[:8], w, state[:8], conv_kernel, conv_bias, x_proj_w, x_proj_sum[:8])


def test_conv_product_lowers_for_cuda_prefetching_the_ssm_state(monkeypatch):
  """At mamba-370m's sizes the compiled kernel takes the SSM state as an operand and issues TMA
  prefetches of it (the interpreter has no L2 to fill; the H100 measured the gain)."""
  shapes = [jax.ShapeDtypeStruct(s, t) for s, t in [
      ((64, 1024), jnp.bfloat16), ((1024, 4096), jnp.bfloat16), ((64, 3, 2048), jnp.bfloat16), ((4, 2048), jnp.float32),
      ((2048,), jnp.float32), ((2048, 96), jnp.bfloat16), ((64, 96), jnp.float32), ((64, 2048, 16), jnp.float32)]]

  def lowered(prefetch):
    monkeypatch.setattr(decode_matmul, "PREFETCH_STATE", prefetch)
    jax.clear_caches()
    return jax.jit(decode_matmul.conv_product).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  on, off = lowered(True), lowered(False)
  assert "cp.async.bulk.prefetch.tensor" in on and "cp.async.bulk.prefetch.tensor" not in off
  assert "64x2048x16xf32" in on and "64x2048x16xf32" not in off
  assert on.count("output_operand_alias<") == off.count("output_operand_alias<") == 1  # x_proj_sum in place


def test_add_product_lowers_for_cuda_in_place_and_refuses_what_it_cannot_add():
  # The interpreter has no TMA reductions; the H100 checks the sums (scripts/bench_generate.py --check).
  for rows, k, n, zero in [(64, 2048, 96, None), (128, 2048, 1024, None), (64, 2048, 1024, 96)]:
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              [((rows, n), jnp.float32), ((rows, k), jnp.bfloat16), ((k, n), jnp.bfloat16)]]
    if zero:
      shapes.append(jax.ShapeDtypeStruct((rows, zero), jnp.float32))
    text = jax.jit(decode_matmul.add_product).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert text.count("output_operand_alias<") == (2 if zero else 1)  # acc, and zero, in place
  x, w = jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of 64"):
    decode_matmul.add_product(jnp.zeros((8, 64), jnp.float32), x, w)


def test_mamba_fused_decoding_step_matches_xla(monkeypatch):
  """Two bf16 Mamba decoding steps at 64 rows through the fused path (the step kernel,
  conv_product interpreted, out_proj's add_product emulated, since the interpreter has no TMA
  reductions) against XLA's ops (scan_impl reference); x_proj_sum is zero again after each."""
  # dt_rank 64: x_proj's rank + 2N = 96 columns tile as mamba-370m's do.
  cfg = tiny_config("mamba", **{"model.d_model": 64, "model.dt_rank": 64, "model.dtype": "bfloat16",
                                "model.scan_impl": "pallas"}).model
  model = generate.inference_model(lm.build(cfg, seed=0))
  batch = 64
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
  cache = model.init_cache(batch, 8)
  cache = jax.tree_util.tree_map_with_path(  # A random state, x_proj_sum's zero kept.
      lambda path, c: c if "x_proj_sum" in jax.tree_util.keystr(path) or not c.ndim
      else jax.random.normal(jax.random.key(c.ndim), c.shape).astype(c.dtype), cache)

  def two_steps(scan_impl):
    for block in model.backbone.blocks:
      block.mixer.scan_impl = scan_impl
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))
    first, after = step(params, tokens, cache)
    return first, *step(params, tokens, after)

  want = two_steps("reference")
  calls = []
  monkeypatch.setattr(decode_matmul, "_on_gpu", lambda: True)
  monkeypatch.setattr(decode_matmul, "matmul", functools.partial(decode_matmul.matmul, interpret=plgpu.InterpretGPUParams()))
  conv_product = functools.partial(decode_matmul.conv_product, interpret=plgpu.InterpretGPUParams())
  monkeypatch.setattr(decode_matmul, "conv_product", lambda *a: calls.append("conv") or conv_product(*a))

  def add_product(acc, x, w, zero):
    calls.append("add")
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32), jnp.zeros_like(zero)
  monkeypatch.setattr(decode_matmul, "add_product", add_product)
  got = two_steps("pallas")
  assert calls == ["conv", "add"] * cfg.n_layer  # traced once, run twice
  for logits, logits_want in [(got[0], want[0]), (got[1], want[1])]:
    err = float(jnp.linalg.norm(logits - logits_want) / jnp.linalg.norm(logits_want))
    assert err < 2e-2, err
  sums = [c for path, c in jax.tree_util.tree_leaves_with_path(got[2]) if "x_proj_sum" in jax.tree_util.keystr(path)]
  assert len(sums) == cfg.n_layer and not any(np.any(np.asarray(c)) for c in sums)
