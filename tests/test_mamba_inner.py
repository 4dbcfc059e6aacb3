"""model.fused_inner (kernels/mamba_inner.py, kernels/causal_conv1d.py) against float64 references:
the conv kernels in Pallas's GPU interpreter against float64 autodiff of the conv, the fused mixer
against the unfused mixer computed in float64, and the kernels lowered for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import mosaic_gpu as plgpu

from configs import dense_mamba as dense_mamba_config
from configs import mamba as mamba_config
from kernels import causal_conv1d
from seqmodels import lm
from seqmodels.errors import UserError
from seqmodels.mamba import MambaMixer

WIDTH = 4


def _conv_reference(xz, state, kernel, bias):
  """silu(conv(x) + bias) for x = xz's first half, by shifted slices of [state, x]."""
  channels = kernel.shape[1]
  length = xz.shape[1]
  padded = jnp.concatenate([state, xz[..., :channels]], axis=1)
  return jax.nn.silu(sum(padded[:, k:k + length] * kernel[k] for k in range(WIDTH)) + bias)


@pytest.mark.parametrize("parts", [1, 2])
def test_conv_kernels_match_float64_autodiff(parts):
  """Two segments (the halos between them and the conv state before the first), one block of
  channels and one of the z pass-through; the backward against float64 autodiff, dz copied, with
  the output's cotangent whole or as two parts that the kernel adds (Mamba's dx from the scan and
  from x_proj)."""
  rng = np.random.default_rng(0)
  batch, segment, channels = 2, causal_conv1d.INTERPRET_SEGMENT, causal_conv1d.CHANNELS
  length = 2 * segment
  inputs = dict(xz=rng.normal(size=(batch, length, 2 * channels)),
                state=rng.normal(size=(batch, WIDTH - 1, channels)),
                kernel=rng.normal(size=(WIDTH, channels)) / 2, bias=rng.normal(size=channels) / 4)
  dy, dz = rng.normal(size=(batch, length, channels)), rng.normal(size=(batch, length, channels))
  with jax.enable_x64(True):
    want, vjp = jax.vjp(_conv_reference, *(jnp.asarray(v) for v in inputs.values()))
    want_dxz, want_dstate, want_dkernel, want_dbias = (np.array(g) for g in vjp(jnp.asarray(dy)))
  want_dxz[..., channels:] = dz

  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
  dy, dz = jnp.asarray(dy, jnp.float32), jnp.asarray(dz, jnp.float32)
  interpret = plgpu.InterpretGPUParams()
  x = f32["xz"][..., :channels]
  halo = causal_conv1d.left_halo(x, f32["state"], segment)
  y = causal_conv1d.forward(f32["xz"], halo, f32["kernel"], f32["bias"], interpret=interpret)
  dy_parts = [dy] if parts == 1 else [dy / 4, dy * 0.75]
  dxz, dparams, dhalo = causal_conv1d.backward(
      f32["xz"], halo, causal_conv1d.right_halo(x, WIDTH, segment), f32["kernel"], f32["bias"],
      dy_parts, [causal_conv1d.right_halo(part, WIDTH, segment) for part in dy_parts], dz,
      interpret=interpret)

  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  close(y, want)
  close(dxz, want_dxz)
  dparams = np.asarray(dparams).sum(axis=(0, 1))
  close(dparams[:WIDTH], want_dkernel)
  close(dparams[WIDTH], want_dbias)
  close(dhalo[:, 0], want_dstate)


def _mixer_config(**overrides):
  cfg = mamba_config.get_config("tiny").model
  cfg.d_model = 64  # d_inner = 128, one block of channels
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.mark.parametrize("with_cache", [False, True])
def test_fused_mixer_matches_float64_mixer(with_cache):
  """Output, new cache and gradients of every parameter, the input and the cache at an odd length
  (13 steps: 2 conv segments, 2 scan chunks, padded), against the unfused mixer in float64 with
  the "reference" scan, on the same parameters and inputs."""
  batch, length = 2, 13
  mixer = MambaMixer(_mixer_config(fused_inner=True, scan_impl="pallas"), dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  graph, params = nnx.split(mixer)
  keys = jax.random.split(jax.random.key(1), 4)
  u = jax.random.normal(keys[0], (batch, length, 64))
  weights = jax.random.normal(keys[1], (batch, length, 64))
  cache = None
  if with_cache:  # a prefill continuing from earlier tokens
    cache = {"conv": jax.random.normal(keys[2], (batch, WIDTH - 1, 128)),
             "ssm": jax.random.normal(keys[3], (batch, 128, 16))}

  def loss(params, u, cache, fused_inner, scan_impl):
    mixer = nnx.merge(graph, params)
    mixer.fused_inner, mixer.scan_impl = fused_inner, scan_impl
    y, new_cache = mixer(u, cache)
    total = jnp.sum(y * weights.astype(y.dtype))
    if new_cache is not None:
      total = total + jnp.sum(new_cache["ssm"] * jnp.linspace(-1, 1, 16)) + jnp.sum(new_cache["conv"] ** 2)
    return total, (y, new_cache)

  grad = functools.partial(jax.grad, loss, argnums=(0, 1, 2), has_aux=True)
  got = jax.jit(grad(), static_argnums=(3, 4))(params, u, cache, True, "pallas")
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    want = jax.jit(grad(), static_argnums=(3, 4))(as64(params), as64(u), as64(cache), False,
                                                   "reference")
    want = jax.tree.map(np.asarray, want)
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(got_leaves) == len(jax.tree.leaves(want)) == (15 if with_cache else 11)
  for (path, g), w in zip(got_leaves, jax.tree.leaves(want)):
    scale = np.abs(w).max()
    np.testing.assert_allclose(np.asarray(g, np.float64) / scale, w / scale, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_conv_kernels_lower_for_cuda():
  """Mamba's sizes (64-step segments, two channel blocks, bf16): layout inference, the copies and
  the shared-memory budget, checked without a GPU."""
  dtype = jnp.bfloat16
  batch, length, channels = 2, 2 * causal_conv1d.SEGMENT, 2 * causal_conv1d.CHANNELS
  segments = length // causal_conv1d.SEGMENT
  seq = lambda width: jax.ShapeDtypeStruct((batch, length, width), dtype)
  halo = jax.ShapeDtypeStruct((batch, segments, WIDTH - 1, channels), dtype)
  kernel, bias = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((WIDTH, channels), (channels,)))
  jax.jit(causal_conv1d.forward).trace(seq(2 * channels), halo, kernel, bias).lower(
      lowering_platforms=("cuda",))
  jax.jit(causal_conv1d.backward).trace(seq(2 * channels), halo, halo, kernel, bias,
                                        [seq(channels)] * 2, [halo] * 2,
                                        seq(channels)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("config, overrides, message", [
    (mamba_config, {"scan_impl": "associative"}, "runs the Pallas scan"),
    (mamba_config, {"d_model": 40}, "multiple of 128"),
    (dense_mamba_config, {}, "not 'dense_mamba'"),
])
def test_fused_inner_refuses_what_it_cannot_run(config, overrides, message):
  cfg = config.get_config("tiny").model
  cfg.fused_inner = True
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(UserError, match=message):
    lm.build(cfg)
