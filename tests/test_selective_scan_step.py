"""The fused Mamba decoding-step kernel, in Pallas interpret mode on CPU, against the float64 oracle,
and a Mamba block's decoding step through it against the block's own parallel forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from kernels import selective_scan_step
from seqmodels import lm
from test_selective_scan import oracle

BATCH = 3


@pytest.mark.parametrize("d, n, rank, dtype", [(256, 16, 48, jnp.bfloat16), (64, 8, 8, jnp.float32)])
def test_decode_step_matches_oracle(d, n, rank, dtype):
  """Rank 48 is mamba-130m's (read in pieces of 32 and 16); d 256 gives two channel blocks per row."""
  rng = np.random.default_rng(d)
  inputs = dict(xz=rng.normal(size=(BATCH, 2 * d)), conv_state=rng.normal(size=(BATCH, 3, d)),
                x=rng.normal(size=(BATCH, d)),
                x_proj_out=rng.normal(size=(BATCH, rank + 2 * n)),
                dt_weight=rng.normal(size=(rank, d)) * rank**-0.5 - 0.3 / rank, dt_bias=rng.uniform(-4, -2, size=d),
                A_log=np.log(rng.uniform(0.5, 16.0, size=(d, n))), D=rng.normal(size=d),
                h=rng.normal(size=(BATCH, d, n)))
  in_dtype = {"xz": dtype, "conv_state": dtype, "x": dtype, "x_proj_out": dtype, "dt_weight": dtype}
  # The oracle sees exactly the values the kernel gets (rounded to the compute dtype).
  inputs = {k: np.asarray(jnp.asarray(v, in_dtype.get(k, jnp.float32)), np.float64) for k, v in inputs.items()}
  args = {k: jnp.asarray(v, in_dtype.get(k, jnp.float32)) for k, v in inputs.items()}
  y, h, conv_state = selective_scan_step.decode_step(**args, interpret=True)

  dt = inputs["x_proj_out"][:, :rank] @ inputs["dt_weight"]
  # The kernel rounds dt_proj's output to the compute dtype, as the XLA matmul it replaces does.
  dt = np.asarray(jnp.asarray(dt, dtype), np.float64)
  B, C = inputs["x_proj_out"][:, rank:rank + n], inputs["x_proj_out"][:, rank + n:]
  want_y, want_h = oracle(x=inputs["x"][:, None], dt=dt[:, None], A=-np.exp(inputs["A_log"]), B=B[:, None],
                          C=C[:, None], D=inputs["D"], z=inputs["xz"][:, None, d:], dt_bias=inputs["dt_bias"],
                          dt_softplus=True, h0=inputs["h"], return_state=True)
  assert y.dtype == dtype and y.shape == (BATCH, d) and h.dtype == jnp.float32
  np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
  # The conv's state drops its oldest input and appends the new one (xz's first half), exactly.
  want_conv = np.concatenate([inputs["conv_state"][:, 1:], inputs["xz"][:, None, :d]], axis=1)
  assert conv_state.dtype == dtype
  np.testing.assert_array_equal(np.asarray(conv_state, np.float64), want_conv)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2  # y is rounded to bf16 (8 bits of mantissa).
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y[:, 0], rtol=tolerance, atol=tolerance)


def test_unsupported_sizes_are_refused():
  assert selective_scan_step.supported(2048, 16) and selective_scan_step.supported(1536, 16)
  assert not selective_scan_step.supported(96, 12)
  with pytest.raises(ValueError, match="shapes disagree"):
    selective_scan_step.decode_step(jnp.zeros((2, 64)), jnp.zeros((2, 3, 64)), jnp.zeros((2, 64)),
                                    jnp.zeros((2, 40)), jnp.zeros((8, 64)), jnp.zeros(64), jnp.zeros((64, 16)),
                                    jnp.zeros(64), jnp.zeros((2, 64, 16)))


@pytest.mark.parametrize("scan_impl", ["pallas", "reference"])
def test_mamba_decoding_steps_equal_the_parallel_forward(scan_impl):
  """Prefill 5 tokens, then 3 single-token steps (the fused kernel with "pallas", XLA's step with
  "reference"): the logits equal the parallel forward's at those positions."""
  cfg = tiny_config("mamba").model
  model = lm.build(cfg, seed=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  full = model(tokens)
  logits, cache = model.prefill(tokens[:, :5], model.init_cache(2))
  np.testing.assert_allclose(logits[:, -1], full[:, 4], rtol=2e-4, atol=2e-4)
  for block in model.backbone.blocks:
    block.mixer.scan_impl = scan_impl
  assert model.backbone.blocks[0].mixer.fused_decoding() == (scan_impl == "pallas")
  step = nnx.jit(lambda model, tokens_t, cache: model.step(tokens_t, cache))
  for t in range(5, 8):
    logits, cache = step(model, tokens[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], rtol=2e-4, atol=2e-4)
