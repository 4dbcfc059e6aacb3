"""The Mosaic GPU kernels, run on CPU by Pallas's GPU interpreter against float64 references, and
lowered for CUDA at Mamba's sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import selective_scan, selective_scan_gpu
from kernels.selective_scan_pallas import selective_scan_pallas
from test_selective_scan import oracle

BATCH, LENGTH, N_STATE, CHUNK = 2, 21, 8, 8
SEQUENCE_INPUTS = ("x", "dt", "B", "C", "z")  # in the inputs' dtype; the rest are float32


def _random_inputs(rng, d, n, groups, dtype, length=LENGTH):
  """Mamba-like inputs, rounded to `dtype` and returned as float64 NumPy arrays."""
  seq, bc = (BATCH, length, d), (BATCH, length, groups, n)
  inputs = dict(x=rng.normal(size=seq), dt=rng.normal(-1.0, 0.5, size=seq),
                A=-rng.uniform(0.5, 2.0, size=(d, n)), B=rng.normal(size=bc),
                C=rng.normal(size=bc), D=rng.normal(size=d), z=rng.normal(size=seq),
                dt_bias=rng.uniform(-0.2, 0.2, size=d), h0=rng.normal(size=(BATCH, d, n)))
  return {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in inputs.items()}


def _on_device(inputs, dtype):
  """The arrays a kernel sees: the sequence inputs in `dtype`, parameters and h0 in float32."""
  return {k: jnp.asarray(v, dtype if k in SEQUENCE_INPUTS else jnp.float32)
          for k, v in inputs.items()}


@pytest.mark.parametrize("groups, dtype, channels, slots, window",
                         [(2, jnp.float32, 32, 2, 3), (1, jnp.bfloat16, 16, 3, 2),
                          (1, jnp.bfloat16, 128, 2, 1), (1, jnp.float32, 64, 2, 2)])
def test_mosaic_gpu_forward_matches_oracle(groups, dtype, channels, slots, window, monkeypatch):
  """Two groups of channels (or one), an odd length (padding steps must leave the state alone),
  h0, D, z, dt_bias and softplus; the saved chunk states are the oracle's states at the chunk
  boundaries. Blocks of 32, 16, 128 or 64 channels: 4, 8, 1 or 2 blocks a group of 128, whose 8
  states a channel split over 4, 8, 1 or 2 lanes (2, 1, 8 or 4 states each); the lanes' partial
  sums of y meet in shared memory. Inputs 1 or 2 windows ahead (2 or 3 buffers). Windows of 3
  chunks (the whole sequence, two of its chunks' start states saved mid-window) or of 1
  (FORWARD_CHUNKS 2 does not divide the 3 chunks, nor 1).

  The interpreter runs a warpgroup as one program, so it checks the arithmetic and the copies, not
  the barriers between warps: those only a GPU run checks (scripts/bench_scan.py --check).
  """
  monkeypatch.setattr(selective_scan_gpu, "FORWARD_CHANNELS", channels)
  monkeypatch.setattr(selective_scan_gpu, "FORWARD_SLOTS", slots)
  monkeypatch.setattr(selective_scan_gpu, "FORWARD_CHUNKS", window)
  d = 2 * selective_scan_gpu.CHANNELS if groups == 2 else selective_scan_gpu.CHANNELS
  inputs = _random_inputs(np.random.default_rng(0), d, N_STATE, groups, dtype)
  padded_length = -(-LENGTH // CHUNK) * CHUNK
  arrays = _on_device(inputs, dtype)
  for name in SEQUENCE_INPUTS:
    arrays[name] = jnp.pad(arrays[name], [(0, 0), (0, padded_length - LENGTH)]
                           + [(0, 0)] * (arrays[name].ndim - 2))

  y, h_last, chunks = selective_scan_gpu.forward(
      *(arrays[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "h0")), length=LENGTH,
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
    # The kernels keep the saved states channels-last: (batch, chunks, n, d).
    np.testing.assert_allclose(chunks[:, k], np.swapaxes(want_state, 1, 2), rtol=1e-5, atol=1e-5,
                               err_msg=f"chunk {k}")


@pytest.mark.parametrize("n, groups, dtype, reverse, gated, channels",
                         [(16, 2, jnp.float32, True, True, 32),
                          (8, 1, jnp.bfloat16, False, False, 16),
                          (16, 1, jnp.float32, False, True, 64)])
def test_mosaic_gpu_backward_matches_float64_autodiff(n, groups, dtype, reverse, gated,
                                                      channels, monkeypatch):
  """Forward and backward through selective_scan_pallas's custom_vjp in the GPU interpreter, with
  h0, D, dt_bias, softplus and the final state's cotangent, at an odd length (two chunks of
  8); with the z gate or without it (DenseMamba's readout scan). n = 16 sums dB_t and dC_t over 4
  steps at a time, two reduction tiles a chunk, each one span of 4 steps recomputed; n = 8 over
  8, one tile of two spans. Blocks of 32, 16 or 64 channels (4, 8 or 2 a group of 128), whose n
  states a channel split over 4, 8 or 2 lanes (4, 1 or 8 states each): the lanes' partial sums
  for dx, ddt and dz meet in shared memory, and the row sums of dB_t, dC_t leave as one partial a
  block (the GPU adds them by reducing copies, which the interpreter lacks). The reference is
  autodiff of impl="reference" in float64 on the same (rounded) values."""
  monkeypatch.setattr(selective_scan_gpu, "BACKWARD_CHANNELS", channels)
  d = groups * selective_scan_gpu.CHANNELS
  rng = np.random.default_rng(1)
  inputs = _random_inputs(rng, d, n, groups, dtype, length=13)
  if not gated:
    del inputs["z"]
  # Cotangents exact in dtype: y's cotangent is rounded to y's dtype on the way in.
  weights = [np.asarray(jnp.asarray(rng.normal(size=shape), dtype), np.float64)
             for shape in ((BATCH, 13, d), (BATCH, d, n))]
  flags = dict(dt_softplus=True, reverse=reverse)

  def loss(arrays, scan):
    y, h = scan(arrays)
    # The weights become arrays of the state's dtype here: multiplied as float64 NumPy arrays, the
    # float32 and float64 passes shared one cached one-op executable, which a float32 pass then ran
    # on float32 buffers (an XLA input mismatch, depending on the tests run before).
    y_weight, h_weight = (jnp.asarray(w, h.dtype) for w in weights)
    return (y.astype(h.dtype) * y_weight).sum() + (h * h_weight).sum()

  def kernels(a):
    return selective_scan_pallas(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a.get("z"),
                                 a["dt_bias"], True, a["h0"], reverse, True,
                                 interpret=plgpu.InterpretGPUParams())

  got = jax.grad(loss)(_on_device(inputs, dtype), kernels)
  with jax.enable_x64(True):
    reference = functools.partial(selective_scan, impl="reference", return_state=True, **flags)
    want = jax.grad(loss)({k: jnp.asarray(v) for k, v in inputs.items()},
                          lambda a: reference(**a))
  for name in inputs:
    assert got[name].dtype == _on_device(inputs, dtype)[name].dtype, name
    # The sequence inputs' gradients come out rounded to their dtype; the rest stay float32.
    tolerance = 2e-2 if dtype == jnp.bfloat16 and name in SEQUENCE_INPUTS else 1e-4
    np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=tolerance,
                               atol=tolerance, err_msg=name)


@pytest.mark.parametrize("batch, d, sms, want", [(8, 1536, 132, 32), (8, 2048, 132, 64),
                                                 (16, 1536, 132, 32), (8, 3072, 132, 32),
                                                 (8, 2048, 256, 32), (1, 128, 132, 32)])
def test_block_channels_fill_the_fewest_waves(batch, d, sms, want, monkeypatch):
  """The block sizes measured on an H100 (kernels/NOTES.md, session 9): 64 channels only where
  they take one wave of the SMs and 32 channels two (Mamba-370m's batch 8 x d 2048); a device with
  more SMs holds 512 blocks of 32 at once."""
  monkeypatch.setattr(selective_scan_gpu, "_multiprocessor_count", lambda: sms)
  assert selective_scan_gpu._block_channels(batch * d) == want


def test_mosaic_gpu_kernels_read_the_gate_in_place():
  """The gate z as the last d channels of a wider array (Mamba's in_proj output xz, which the fused
  mixer hands over whole so that XLA copies no half of it out) gives the outputs of z alone, bit for
  bit, in the forward and the backward; the other channels are x, which a wrong offset would
  read."""
  d, n, length = selective_scan_gpu.CHANNELS, 8, 16
  arrays = _on_device(_random_inputs(np.random.default_rng(2), d, n, 1, jnp.bfloat16, length),
                      jnp.bfloat16)
  xz = jnp.concatenate([arrays["x"], arrays["z"]], axis=-1)
  common = dict(length=length - 3, softplus=True, chunk=CHUNK, interpret=plgpu.InterpretGPUParams())
  rng = np.random.default_rng(3)
  dy = jnp.asarray(rng.normal(size=arrays["x"].shape), jnp.bfloat16)
  dh_last = jnp.asarray(rng.normal(size=arrays["h0"].shape), jnp.float32)

  def scan(z):
    args = [arrays[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    y, h_last, chunks = selective_scan_gpu.forward(*args, z, arrays["h0"], save_chunks=True, **common)
    grads = selective_scan_gpu.backward(*args, z, chunks, dy, dh_last, **common)
    return (y, h_last, chunks) + grads

  for name, want, got in zip(("y", "h_last", "chunks", "dx", "ddt", "dz", "dB", "dC", "dA", "dD",
                              "ddt_bias", "dh0"), scan(arrays["z"]), scan(xz)):
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                  err_msg=name)


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float32))
def test_mosaic_gpu_kernels_lower_for_cuda(dtype):
  """Mamba's sizes (n = 16, chunks of 16): layout inference, the strided shared-memory accesses
  and the shared-memory budget, checked without a GPU."""
  batch, length, d, n, chunk = 2, 64, 256, 16, 16
  seq = jax.ShapeDtypeStruct((batch, length, d), dtype)
  bc = jax.ShapeDtypeStruct((batch, length, 1, n), dtype)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  state, chunks = f32(batch, d, n), f32(batch, length // chunk, n, d)
  common = dict(length=length - 3, softplus=True, chunk=chunk)
  forward = functools.partial(selective_scan_gpu.forward, save_chunks=True, **common)
  backward = functools.partial(selective_scan_gpu.backward, **common)
  xz = jax.ShapeDtypeStruct((batch, length, 2 * d), dtype)  # the gate read in place
  for gate in (seq, xz):
    jax.jit(forward).trace(seq, seq, f32(d, n), bc, bc, f32(d), f32(d), gate, state).lower(
        lowering_platforms=("cuda",))
    jax.jit(backward).trace(seq, seq, f32(d, n), bc, bc, f32(d), f32(d), gate, chunks, seq,
                            state).lower(lowering_platforms=("cuda",))
