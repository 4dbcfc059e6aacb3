"""linear_attention(impl="pallas"): the TPU kernels' gradients in TPU interpret mode against float64
autodiff, and both Mosaic backends lowered without their device (the GPU kernels' numerics only a GPU
checks: see kernels/NOTES.md). test_linear_attention.py checks the forward against the oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_attention, linear_attention_gpu, linear_attention_tpu
from oracle import to_jax, to_numpy
from test_linear_attention import CHUNK, oracle, setup


def _gradients(impl, inputs, flags, dtype, weights, chunk_size=CHUNK):
  def loss(arrays):
    o, s = linear_attention(**arrays, **flags, impl=impl, chunk_size=chunk_size)
    return (o * weights[0]).sum() + (s * weights[1]).sum()
  return to_numpy(jax.jit(jax.grad(loss))(to_jax(inputs, dtype)))


@pytest.mark.parametrize("decay, reverse", [("token", False), ("channel", True), ("head", False),
                                            ("none", False)])
def test_gradients_match_float64_reference(decay, reverse):
  """The hand-written backward (float32 kernels) against autodiff of "reference" in float64, itself
  checked against finite differences of the oracle in test_linear_attention.py."""
  inputs, flags = setup(decay=decay, with_h0=True, reverse=reverse, return_state=True, seed=1)
  o, s = oracle(**inputs, **flags)
  rng = np.random.default_rng(2)
  weights = (rng.normal(size=o.shape), rng.normal(size=s.shape))
  got = _gradients("pallas", inputs, flags, jnp.float32, weights)
  with jax.enable_x64(True):
    want = _gradients("reference", inputs, flags, jnp.float64, weights)
  assert set(got) == set(inputs)
  for name in inputs:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("decay", ("token", "channel"))
def test_stable_under_strong_decay_over_long_chunks(decay):
  # Cumulative log-decays reach -3200 within a chunk: only exponentials of differences stay finite.
  inputs, flags = setup(length=200, decay=decay, with_h0=True, decay_range=(-50.0, -20.0),
                        return_state=True)
  weights = (np.random.default_rng(3).normal(size=inputs["v"].shape), 1.0)
  got = _gradients("pallas", inputs, flags, jnp.float32, weights, chunk_size=64)
  want = _gradients("reference", inputs, flags, jnp.float32, weights)
  for name in inputs:
    assert np.all(np.isfinite(got[name]))
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_auto_is_chunked_on_cpu():
  inputs, _ = setup()
  arrays = to_jax(inputs)
  np.testing.assert_array_equal(linear_attention(**arrays), linear_attention(**arrays, impl="chunked"))


def test_float64_is_a_one_line_error():
  inputs, _ = setup()
  with jax.enable_x64(True), pytest.raises(ValueError, match=r"^impl='pallas' takes float32 or bfloat16"):
    linear_attention(**to_jax(inputs, jnp.float64), impl="pallas")


def _abstract(batch, length, heads, dk, dv, dg):
  seq = lambda d, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((batch, length, heads, d), dtype)
  state = jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)
  return seq(dk), seq(dv), seq(dg, jnp.float32), state


@pytest.mark.parametrize("per_channel", (False, True))
@pytest.mark.parametrize("kernels, platform, shape", [
    (linear_attention_gpu, "cuda", (2, 128, 3, 128, 64)),
    (linear_attention_tpu, "tpu", (1, 128, 2, 128, 128)),
], ids=["mosaic_gpu", "mosaic_tpu"])
def test_kernels_lower_without_the_device(kernels, platform, shape, per_channel):
  """Mosaic GPU: layout inference, the wgmma operand layouts and the SMEM budget; Mosaic TPU: block
  shapes, dot and reduction forms. Both checked without the accelerator."""
  qk, v, c, state = _abstract(*shape, 128 if per_channel else 1)
  forward = functools.partial(kernels.forward, chunk_size=64, interpret=False)
  backward = functools.partial(kernels.backward, chunk_size=64, interpret=False)
  traced = jax.jit(forward).trace(qk, qk, v, c, state)
  traced.lower(lowering_platforms=(platform,))
  states = traced.out_info[2]  # The saved states, whose layout each backend chooses.
  jax.jit(backward).trace(qk, qk, v, c, states, v, state).lower(lowering_platforms=(platform,))
