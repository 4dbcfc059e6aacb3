"""The Mosaic GPU forward kernel, run on CPU by Pallas's GPU interpreter, against the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import selective_scan_gpu
from test_selective_scan import oracle

BATCH, LENGTH, N_STATE, CHUNK = 2, 21, 8, 8


@pytest.mark.parametrize("groups, dtype, auto_barriers",
                         [(2, jnp.float32, True), (1, jnp.bfloat16, False)])
def test_mosaic_gpu_forward_matches_oracle(groups, dtype, auto_barriers, monkeypatch):
  """Two channel blocks, an odd length (padding steps must leave the state alone), h0, D, z,
  dt_bias and softplus; the saved chunk states are the oracle's states at the chunk boundaries.

  The interpreter runs a warpgroup as one program, so it checks the arithmetic and the copies, not
  the barriers between warps: those only a GPU run checks (scripts/bench_scan.py --check).
  """
  monkeypatch.setattr(selective_scan_gpu, "AUTO_BARRIERS", auto_barriers)
  d = 2 * selective_scan_gpu.CHANNELS if groups == 2 else selective_scan_gpu.CHANNELS
  rng = np.random.default_rng(0)
  seq, bc = (BATCH, LENGTH, d), (BATCH, LENGTH, groups, N_STATE)
  inputs = dict(x=rng.normal(size=seq), dt=rng.normal(-1.0, 0.5, size=seq),
                A=-rng.uniform(0.5, 2.0, size=(d, N_STATE)), B=rng.normal(size=bc),
                C=rng.normal(size=bc), D=rng.normal(size=d), z=rng.normal(size=seq),
                dt_bias=rng.uniform(-0.2, 0.2, size=d), h0=rng.normal(size=(BATCH, d, N_STATE)))
  inputs = {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in inputs.items()}
  padded_length = -(-LENGTH // CHUNK) * CHUNK

  def device(name):
    value = inputs[name]
    if value.ndim >= 3 and value.shape[1] == LENGTH:
      value = np.pad(value, [(0, 0), (0, padded_length - LENGTH)] + [(0, 0)] * (value.ndim - 2))
    return jnp.asarray(value, dtype if name in ("x", "dt", "B", "C", "z") else jnp.float32)

  y, h_last, chunks = selective_scan_gpu.forward(
      *(device(k) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "h0")), length=LENGTH,
      softplus=True, chunk=CHUNK, save_chunks=True, interpret=plgpu.InterpretGPUParams())

  want_y, want_h = oracle(**inputs, dt_softplus=True, return_state=True)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  assert y.dtype == dtype and y.shape == (BATCH, padded_length, d)
  np.testing.assert_allclose(np.asarray(y[:, :LENGTH], np.float64), want_y, rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(h_last, want_h, rtol=1e-5, atol=1e-5)
  for k in range(padded_length // CHUNK):
    prefix = {name: v[:, :k * CHUNK] if v.ndim >= 3 and v.shape[1] == LENGTH else v
              for name, v in inputs.items()}
    want_state = inputs["h0"] if k == 0 else oracle(**prefix, dt_softplus=True, return_state=True)[1]
    np.testing.assert_allclose(chunks[:, k], want_state, rtol=1e-5, atol=1e-5, err_msg=f"chunk {k}")
