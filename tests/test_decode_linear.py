"""The decoding-step projection kernel (kernels/decode_linear.py) in Pallas interpret mode on CPU,
against float64: RMSNorm then the product, and the product plus the residual; and a Transformer++
decoding step through it against the parallel forward (Mamba's: tests/test_selective_scan_step.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from kernels import decode_linear
from seqmodels import lm


def _bf16(a):
  """a rounded to bf16, and the float64 values the kernel then sees."""
  rounded = jnp.asarray(a, jnp.bfloat16)
  return rounded, np.asarray(rounded, np.float64)


def _relative(got, want):
  return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("m, k, n", [(16, 256, 128), (128, 64, 256)])
def test_norm_then_product_matches_float64(m, k, n):
  """(16, 256): one tile, the input dimension split 4 ways (atomic adds); (128, 64): two row blocks
  of 64 and two column blocks of 128, no split."""
  rng = np.random.default_rng(m + k)
  x = rng.normal(size=(m, k)) * rng.uniform(0.1, 10, size=(m, 1))  # Rows of different scales.
  scale = rng.uniform(0.5, 1.5, size=k)
  w, w64 = _bf16(rng.normal(size=(k, n)) * k**-0.5)
  y = decode_linear.linear(jnp.asarray(x, jnp.float32), w, norm_scale=jnp.asarray(scale, jnp.float32), eps=1e-5,
                           interpret=True)
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  want = x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-5) * np.asarray(jnp.asarray(scale, jnp.float32),
                                                                                np.float64) @ w64
  assert y.dtype == jnp.float32 and y.shape == (m, n)
  # x * scale is rounded to bf16 (about 2^-9) before the product.
  assert _relative(y, want) < 4e-3


def test_product_plus_residual_matches_float64():
  """The input dimension split 8 ways, each split adding into the residual."""
  rng = np.random.default_rng(1)
  m, k, n = 32, 512, 64
  x, x64 = _bf16(rng.normal(size=(m, k)))
  w, w64 = _bf16(rng.normal(size=(k, n)) * k**-0.5)
  residual = rng.normal(size=(m, n)).astype(np.float32)
  y = decode_linear.linear(x, w, residual=jnp.asarray(residual), interpret=True)
  assert y.dtype == jnp.float32 and y.shape == (m, n)
  np.testing.assert_allclose(np.asarray(y, np.float64), residual + x64 @ w64, rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_are_refused():
  assert decode_linear.supported(64, 1024, 4096) and decode_linear.supported(256, 2048, 1024)
  assert not decode_linear.supported(8, 1024, 4096)  # Fewer than 16 rows.
  assert not decode_linear.supported(48, 1024, 4096)  # Not a power of two.
  assert not decode_linear.supported(64, 1000, 4096)
  with pytest.raises(ValueError, match="shapes disagree"):
    decode_linear.linear(jnp.zeros((16, 64)), jnp.zeros((32, 64)))
  with pytest.raises(ValueError, match="at least 16 rows"):
    decode_linear.linear(jnp.zeros((8, 64)), jnp.zeros((64, 64)))


def test_gpt_decoding_steps_with_the_kernels_equal_the_parallel_forward():
  """A Transformer++ block's decoding step with its norms and residual adds inside the kernels (as
  on a GPU, here interpreted) gives the parallel forward's logits."""
  cfg = tiny_config("gpt").model
  model = lm.build(cfg, seed=3)
  batch = 16
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 7)), jnp.int32)
  full = model(tokens)
  _, cache = model.prefill(tokens[:, :5], model.init_cache(batch, 8))
  for block in model.backbone.blocks:
    block.decode_kernels = True
  assert all(block.fused_decoding(batch) for block in model.backbone.blocks)
  assert not model.backbone.blocks[0].fused_decoding(8)  # Fewer rows than the kernel multiplies.
  step = nnx.jit(lambda model, tokens_t, cache: model.step(tokens_t, cache))
  for t in range(5, 7):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], rtol=2e-4, atol=2e-4)
