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
  """in_proj and the conv of one token as one kernel: xz, silu(conv) over the window (the conv
  state's rows, then xz's first d columns), and the float32 zero for x_proj."""
  rng = np.random.default_rng(1)
  rows, k, d, width = 64, 256, 128, 4
  x = jnp.asarray(rng.normal(size=(rows, k)) / 8, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, 2 * d)) / 4, jnp.bfloat16)
  state = jnp.asarray(rng.normal(size=(rows, width - 1, d)), jnp.bfloat16)
  conv_kernel = jnp.asarray(rng.normal(size=(width, d)), jnp.float32)
  conv_bias = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
  xz, conv, zero = decode_matmul.conv_product(x, w, state, conv_kernel, conv_bias, 96,
                                              interpret=plgpu.InterpretGPUParams())
  assert _relative_error(xz, x, w) < 5e-3
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  window = np.concatenate([f64(state), f64(xz)[:, None, :d]], axis=1)
  rounded = lambda a: f64(jnp.asarray(a, jnp.bfloat16))  # noqa: E731  the conv module's bf16 weights
  pre = rounded(conv_bias) + np.einsum("bkc,kc->bc", window, rounded(conv_kernel))
  want = pre / (1 + np.exp(-pre))
  assert conv.shape == (rows, d) and conv.dtype == jnp.bfloat16
  assert np.linalg.norm(f64(conv) - want) / np.linalg.norm(want) < 5e-3
  assert zero.shape == (rows, 96) and zero.dtype == jnp.float32 and not np.any(np.asarray(zero))
  with pytest.raises(ValueError, match="multiple of 64"):
    decode_matmul.conv_product(x[:8], w, state[:8], conv_kernel, conv_bias, 96)


def test_add_product_lowers_for_cuda_in_place_and_refuses_what_it_cannot_add():
  # The interpreter has no TMA reductions; the H100 checks the sums (scripts/bench_generate.py --check).
  for rows, k, n in [(64, 2048, 96), (128, 2048, 1024)]:
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              [((rows, n), jnp.float32), ((rows, k), jnp.bfloat16), ((k, n), jnp.bfloat16)]]
    text = jax.jit(decode_matmul.add_product).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "output_operand_alias<output_tuple_indices = [], operand_index = 2" in text
  x, w = jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of 64"):
    decode_matmul.add_product(jnp.zeros((8, 64), jnp.float32), x, w)


def test_mamba_fused_decoding_step_matches_xla(monkeypatch):
  """A bf16 Mamba decoding step at 64 rows through the fused path (the step kernel, conv_product,
  and the in-place adds of x_proj and out_proj, emulated in float32 since the interpreter has no
  TMA reductions) against XLA's ops (scan_impl reference)."""
  # dt_rank 64: x_proj's rank + 2N = 96 columns tile as mamba-370m's do.
  cfg = tiny_config("mamba", **{"model.d_model": 64, "model.dt_rank": 64, "model.dtype": "bfloat16",
                                "model.scan_impl": "pallas"}).model
  model = generate.inference_model(lm.build(cfg, seed=0))
  batch = 64
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
  cache = model.init_cache(batch, 8)
  cache = jax.tree.map(lambda c: jax.random.normal(jax.random.key(1), c.shape, jnp.float32).astype(c.dtype), cache)

  def step(scan_impl):
    for block in model.backbone.blocks:
      block.mixer.scan_impl = scan_impl
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, t, c: nnx.merge(graphdef, p).step(t, c))(params, tokens, cache)

  want, _ = step("reference")
  calls = []
  monkeypatch.setattr(decode_matmul, "_on_gpu", lambda: True)
  monkeypatch.setattr(decode_matmul, "matmul", functools.partial(decode_matmul.matmul, interpret=plgpu.InterpretGPUParams()))
  conv_product = functools.partial(decode_matmul.conv_product, interpret=plgpu.InterpretGPUParams())
  monkeypatch.setattr(decode_matmul, "conv_product", lambda *a: calls.append("conv") or conv_product(*a))
  monkeypatch.setattr(decode_matmul, "add_product",
                      lambda acc, x, w: calls.append("add") or acc + jnp.dot(x, w, preferred_element_type=jnp.float32))
  got, _ = step("pallas")
  assert calls == ["conv", "add", "add"] * cfg.n_layer
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < 2e-2, err
