"""Mamba (Gu & Dao, 2023): a stack of pre-norm residual blocks around the selective SSM mixer.

Per block, with E = expand, N = d_state, R = dt_rank = ceil(d / 16):

    x, z     = in_proj(norm(u))                   d -> 2Ed, no bias
    x        = silu(causal_depthwise_conv1d(x))   width d_conv, with bias
    dt, B, C = x_proj(x)                          Ed -> R + 2N
    dt       = dt_proj(dt)                        R -> Ed; its bias enters the scan as dt_bias
    A        = -exp(A_log)
    y        = S6(x, softplus(dt + dt_bias), A, B, C) + D x,   y *= silu(z)
    u        = u + out_proj(y)                    Ed -> d, no bias

The same code runs the parallel forward (training), prefill and one-token decoding: a cache holds
the last d_conv - 1 conv inputs and the (batch, Ed, N) SSM state, and a decode step is a length-1
forward that starts from them. On a GPU (scan_impl "auto" or "pallas") a decode step runs
everything after x_proj (dt_proj through the gate) as one kernel (kernels/selective_scan_step.py),
in_proj, the conv and x_proj as another, and out_proj adds its parts into the residual in place
(kernels/decode_matmul.py): a step's time is many small kernels, each far under the memory
bandwidth, so each kernel fewer counts. With model.fused_inner the training forward and prefill
run the middle, from in_proj's output to the gated scan output, as one custom_vjp with a conv
kernel (kernels/mamba_inner.py).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import decode_matmul, mamba_inner, selective_scan_step
from kernels._common import on_one_device
from seqmodels import layers
from seqmodels.sharding import selective_scan
from seqmodels.errors import UserError


def dt_rank(cfg) -> int:
  return cfg.dt_rank if cfg.dt_rank > 0 else math.ceil(cfg.d_model / 16)


def _dt_bias_init(key, d_inner, dt_min, dt_max, floor):
  """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], so softplus(dt_bias) starts in that range."""
  u = jax.random.uniform(key, (d_inner,), jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return dt + jnp.log(-jnp.expm1(-dt))


class CausalDepthwiseConv(nnx.Module):
  """Depthwise causal conv over time, channels-last, continuing from `state` (the previous inputs)."""

  def __init__(self, channels, width, *, rngs):
    bound = 1.0 / math.sqrt(width)  # PyTorch's Conv1d default for a depthwise kernel (fan_in = width).
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound),
                            **layers.logical_axes(None, "inner"))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound),
                          **layers.logical_axes("inner"))
    self.width = width

  def __call__(self, x, state):
    """x: (batch, length, channels); state: (batch, width - 1, channels). Returns (y, new_state)."""
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    kernel = self.kernel[...].astype(x.dtype)
    y = sum(padded[:, k:k + length] * kernel[k] for k in range(self.width))
    return y + self.bias[...].astype(x.dtype), self.next_state(x, state)

  def next_state(self, x, state):
    """The last width - 1 inputs once x follows `state`, reaching back into it when x is shorter."""
    kept = self.width - 1
    return jnp.concatenate([state.astype(x.dtype), x[:, -kept:]], axis=1)[:, -kept:]


class MambaMixer(nnx.Module):

  def __init__(self, cfg, *, dtype, rngs):
    d, n = cfg.d_model, cfg.d_state
    d_inner = cfg.expand * d
    rank = dt_rank(cfg)
    self.d_inner, self.d_state, self.d_conv, self.rank = d_inner, n, cfg.d_conv, rank
    self.scan_impl = cfg.scan_impl
    self.fused_inner = cfg.get("fused_inner", False)  # Configs saved before the key lack it.
    self.dtype = dtype

    self.in_proj = layers.linear(d, 2 * d_inner, axes=("embed", "inner"), dtype=dtype, rngs=rngs)
    self.conv1d = CausalDepthwiseConv(d_inner, cfg.d_conv, rngs=rngs)
    self.x_proj = layers.linear(d_inner, rank + 2 * n, axes=("inner", None), dtype=dtype, rngs=rngs)
    self.dt_proj = layers.linear(rank, d_inner, axes=(None, "inner"), dtype=dtype, rngs=rngs,
                                 kernel_init=layers.symmetric_uniform(rank**-0.5))
    self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                           **layers.logical_axes("inner"))
    self.A_log = layers.NoWeightDecay(jnp.log(jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d_inner, 1))),
                                      **layers.logical_axes("inner", None))
    self.D = layers.NoWeightDecay(jnp.ones((d_inner,), jnp.float32), **layers.logical_axes("inner"))
    # The 1/sqrt(n_layer) rescale keeps the residual stream's variance flat with depth.
    out_init = layers.scaled(layers.torch_default_init, 1.0 / math.sqrt(cfg.n_layer))
    self.out_proj = layers.linear(d_inner, d, axes=("inner", "embed"), dtype=dtype, rngs=rngs, kernel_init=out_init)

  def init_cache(self, batch):
    return {
        "conv": jnp.zeros((batch, self.d_conv - 1, self.d_inner), self.dtype),
        "ssm": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32),
        # x_proj's float32 sum on a GPU's decoding step (`decode_step`), zero between tokens.
        "x_proj_sum": jnp.zeros((batch, self.rank + 2 * self.d_state), jnp.float32),
    }

  def scan_inputs(self, u, conv_state=None):
    """The S6 inputs (x, dt, A, B, C) for block input u, the gate z and the new conv state.

    dt is before dt_bias and softplus, which the scan applies.
    """
    x, z = layers.linear_pieces(self.in_proj, u, (self.d_inner, self.d_inner))
    if conv_state is None:
      conv_state = jnp.zeros((u.shape[0], self.d_conv - 1, self.d_inner), x.dtype)
    x, conv_state = self.conv1d(x, conv_state)
    x = jax.nn.silu(x)
    dt, B, C = jnp.split(self.x_proj(x), [self.rank, self.rank + self.d_state], axis=-1)
    dt = self.dt_proj(dt)
    A = -jnp.exp(self.A_log[...])
    return x, dt, A, B, C, z, conv_state

  def __call__(self, u, cache=None):
    if self.fused_inner and u.shape[1] > 1:  # A one-token step would pad to a whole conv segment.
      return self.fused_forward(u, cache)
    x, dt, A, B, C, z, conv_state = self.scan_inputs(u, None if cache is None else cache["conv"])
    with jax.named_scope("scan"):  # Profiles (scripts/bench_train.py) attribute its ops to the scan.
      scan = selective_scan(x, dt, A, B, C, self.D[...], z=z, dt_bias=self.dt_bias[...], dt_softplus=True,
                            h0=None if cache is None else cache["ssm"], return_state=cache is not None,
                            impl=self.scan_impl)
    if cache is None:
      return self.out_proj(scan), None
    y, ssm_state = scan
    return self.out_proj(y), {**cache, "conv": conv_state, "ssm": ssm_state}

  def fused_forward(self, u, cache):
    """The forward with the middle of the mixer in kernels/mamba_inner.py (model.fused_inner)."""
    if not on_one_device():
      raise UserError(f"model.fused_inner runs on one device, not a mesh of "
                      f"{jax.sharding.get_abstract_mesh().size}; set model.fused_inner=False")
    xz = self.in_proj(u)
    start = self.init_cache(u.shape[0]) if cache is None else cache
    with jax.named_scope("scan"):
      y, ssm_state = mamba_inner.mamba_inner(
          xz, start["conv"], self.conv1d.kernel[...], self.conv1d.bias[...], self.x_proj.kernel[...],
          self.dt_proj.kernel[...], self.dt_bias[...], self.A_log[...], self.D[...], start["ssm"])
    if cache is None:
      return self.out_proj(y), None
    return self.out_proj(y), {**cache, "conv": self.conv1d.next_state(xz[..., :self.d_inner], cache["conv"]),
                              "ssm": ssm_state}

  def fused_decoding(self) -> bool:
    """Whether a one-token step runs kernels/selective_scan_step.py: with scan_impl "pallas", or
    "auto" on a GPU (1.61 against 1.73 ms a token for mamba-370m at batch 64 on an H100, NOTES.md),
    on one device, for sizes the kernel takes. On CPU "auto" keeps XLA's ops, which the kernel's
    interpret mode would only slow down."""
    chosen = self.scan_impl == "pallas" or (self.scan_impl == "auto" and jax.default_backend() == "gpu")
    if not chosen or not selective_scan_step.supported(self.d_inner, self.d_state):
      return False
    return on_one_device()

  def decode_step(self, u, residual, cache):
    """One token: residual + the mixer's output for u = norm(residual), both (batch, d_model), the
    residual float32. in_proj, the conv and x_proj, one kernel for the rest of the SSM and the conv
    state's shift, then out_proj. Where kernels/decode_matmul.py takes the projections (a GPU, 64
    rows), in_proj, the conv and x_proj are one kernel adding x_proj's parts into the cache's zero
    "x_proj_sum" (and prefetching the SSM state into L2 for the step kernel), and out_proj adds its
    parts into the residual and clears x_proj_sum again: no reductions of XLA's."""
    fused = decode_matmul.fuses_mamba_step(self.in_proj, self.x_proj, self.out_proj, self.d_conv, u)
    if fused:
      xz, x, x_proj_out = decode_matmul.conv_product(
          u, self.in_proj.kernel[...], cache["conv"], self.conv1d.kernel[...], self.conv1d.bias[...],
          self.x_proj.kernel[...], cache["x_proj_sum"], cache["ssm"])
    else:
      xz = self.in_proj(u)
      x, _ = self.conv1d(xz[:, None, :self.d_inner], cache["conv"])  # The kernel writes the new conv state.
      x = jax.nn.silu(x[:, 0])
      x_proj_out = self.x_proj(x)
    y, ssm_state, conv_state = selective_scan_step.decode_step(
        xz, cache["conv"], x, x_proj_out, self.dt_proj.kernel[...], self.dt_bias[...], self.A_log[...],
        self.D[...], cache["ssm"])
    if fused:
      residual, x_proj_sum = decode_matmul.add_product(residual, y, self.out_proj.kernel[...], zero=x_proj_out)
    else:
      residual, x_proj_sum = residual + self.out_proj(y).astype(jnp.float32), cache["x_proj_sum"]
    return residual, {"conv": conv_state, "ssm": ssm_state, "x_proj_sum": x_proj_sum}

  def extra_flops_per_token(self):
    # The scan itself, beyond the matmuls: about 9 flops per (channel, state) element per token
    # forward (the Mamba paper's count), times 3 for forward plus backward.
    return 3 * 9 * self.d_inner * self.d_state


class MambaBlock(nnx.Module):
  """u + mixer(RMSNorm(u)), with the residual stream u kept in float32."""

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    del layer_index
    self.norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.mixer = MambaMixer(cfg, dtype=dtype, rngs=rngs)

  @staticmethod
  def check_config(cfg):
    for key in ("d_state", "expand", "d_conv"):
      if cfg[key] <= 0:
        raise UserError(f"model.{key} must be positive, got {cfg[key]}; fix the config")
    if cfg.get("fused_inner", False):
      d_inner = cfg.expand * cfg.d_model
      if cfg.scan_impl not in ("auto", "pallas"):
        raise UserError(f"model.fused_inner runs the Pallas scan, not scan_impl={cfg.scan_impl!r}; "
                        "set model.scan_impl=pallas or model.fused_inner=False")
      if not mamba_inner.supported(d_inner):
        raise UserError(f"model.fused_inner needs expand * d_model = {d_inner} to be a multiple of "
                        "128; set model.fused_inner=False")
      if jax.default_backend() == "tpu":
        raise UserError("model.fused_inner has no TPU kernels (its conv kernel is Mosaic GPU); "
                        "set model.fused_inner=False")

  def init_cache(self, batch, max_length):
    del max_length  # A recurrent state does not grow with the sequence.
    return self.mixer.init_cache(batch)

  def __call__(self, u, cache=None):
    if cache is not None and u.shape[1] == 1 and self.mixer.fused_decoding():
      u, cache = self.mixer.decode_step(self.norm(u[:, 0]), u[:, 0], cache)
      return u[:, None], cache
    y, cache = self.mixer(self.norm(u), cache)
    return u + y.astype(jnp.float32), cache

  def extra_flops_per_token(self, seq_len):
    del seq_len
    return self.mixer.extra_flops_per_token()


class Mamba(layers.BlockStack):
  block_class = MambaBlock
  # mamba-370m at batch 64 on an H100: 1.604 -> 1.560 ms a token with it (gpt-350m: 5.99 -> 6.59,
  # so Transformers keep XLA's GEMMs; kernels/NOTES.md).
  decode_matmul = True
