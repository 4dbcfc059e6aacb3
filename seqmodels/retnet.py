"""RetNet (Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large Language Models").

Per block (pre-LayerNorm residuals, `model.norm = "layernorm"`; the projections have no biases):

    Y = X + MSR(LN(X))
    X = Y + FFN(LN(Y)),        FFN(X) = gelu(X W_1) W_2,   W_1: d -> 2d

Multi-scale retention with h heads, key dim d/h and value dim 2d/h per head, head i decaying at
gamma_i = 1 - 2^(-5-i):

    Q = rot(X W_Q),  K = rot(X W_K) / sqrt(d/h),  V = X W_V
    head_i = (Q_i K_i^T ⊙ D_i) V_i,   D_nm = gamma_i^(n-m) for n >= m, else 0      parallel form
           = o_n = Q_n S_n,  S_n = gamma_i S_{n-1} + K_n^T V_n                       recurrent form
    MSR(X) = (swish(X W_G) ⊙ GroupNorm_h(head_1, ..., head_h)) W_O

rot is the paper's e^(i n theta) rotation, i.e. rotary embedding with base 10000 (xPos without
its own decay, which gamma takes over). The chunkwise form runs the parallel form inside chunks
and the recurrence from chunk to chunk. `model.retention_form` picks the training form; all three
give the same result. The recurrent and chunkwise forms are `kernels.linear_attention` with a
constant per-head decay.

The paper also divides D by its row norms and the scores by their row sums to keep fp16 in range;
GroupNorm's per-head scale invariance makes both exact no-ops (up to its epsilon), and retention
here runs in float32, so they are left out and all three forms stay the same function.

Decoding (prefill and one-token steps) continues from each block's (batch, h, d/h, 2d/h) state and
its position, through the recurrent form for "recurrent" and the chunkwise one otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmodels import layers
from seqmodels.sharding import linear_attention
from seqmodels.errors import UserError

RETENTION_FORMS = ("parallel", "chunkwise", "recurrent")


def xavier_uniform(gain: float):
  return nnx.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def head_log_decays(n_head: int):
  """log(gamma_i) = log(1 - 2^(-5-i)) for each head, float32 (log1p keeps gamma near 1 exact)."""
  return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(n_head)))), jnp.float32)


def parallel_retention(q, k, v, log_gamma):
  """(Q K^T ⊙ D) V per head, with D_nm = gamma^(n-m) for n >= m and 0 above the diagonal.

  q, k: (batch, length, heads, dk); v: (batch, length, heads, dv); log_gamma: (heads,). The decay
  mask and both matmuls are float32; the result has the dtype of q and v.
  """
  out_dtype = jnp.result_type(q, v)
  position = jnp.arange(q.shape[1])
  distance = (position[:, None] - position[None, :]).astype(jnp.float32)
  # Masking the exponent keeps gamma^(negative distance) out of exp, where it could overflow.
  exponent = jnp.where(distance >= 0, distance * log_gamma[:, None, None], -jnp.inf)
  decay = jnp.exp(exponent)  # (heads, length, length)
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  scores = jnp.einsum("bnhk,bmhk->bhnm", q, k) * decay
  return jnp.einsum("bhnm,bmhv->bnhv", scores, v).astype(out_dtype)


def retention(q, k, v, log_gamma, *, form, chunk_size, state=None, chunkwise_impl="chunked"):
  """Retention of every head in `form`; with a (batch, heads, dk, dv) state, continues from it.

  Returns (o, new_state), new_state None when no state was given. A continuation runs the
  recurrent form for "recurrent" and the chunkwise one (the parallel form within each chunk, plus
  the carried state) for the other two, so that prefill also hands back the state. The chunkwise
  form runs through linear_attention's `chunkwise_impl` ("chunked", "pallas" or "auto").
  """
  if state is None and form == "parallel":
    return parallel_retention(q, k, v, log_gamma), None
  impl = "reference" if form == "recurrent" else chunkwise_impl
  if state is None:
    return linear_attention(q, k, v, log_gamma, impl=impl, chunk_size=chunk_size), None
  return linear_attention(q, k, v, log_gamma, h0=state, return_state=True, impl=impl, chunk_size=chunk_size)


def check_retention_config(cfg, qk_dim: int, v_dim: int) -> None:
  """The checks both retention architectures share: heads, rotary pairs, form, chunk size."""
  if cfg.n_head <= 0 or qk_dim % cfg.n_head or v_dim % cfg.n_head:
    raise UserError(f"model.n_head={cfg.n_head} must divide the key width {qk_dim} and the value width "
                    f"{v_dim}; pick a head count that divides them")
  if (qk_dim // cfg.n_head) % 2:
    raise UserError(f"key head dim {qk_dim // cfg.n_head} must be even for the rotary embedding; "
                    "change model.n_head or model.d_model")
  if cfg.retention_form not in RETENTION_FORMS:
    raise UserError(f"model.retention_form must be one of {', '.join(RETENTION_FORMS)}, "
                    f"got '{cfg.retention_form}'")
  if cfg.chunk_size <= 0:
    raise UserError(f"model.chunk_size must be positive, got {cfg.chunk_size}; fix the config")


def retention_flops_per_token(seq_len, *, form, chunk_size, qk_dim, v_dim, n_head) -> int:
  """Training flops per token of the retention itself (beyond its projections), forward + backward."""
  state = 4 * qk_dim * v_dim // n_head  # Writing k v^T into the (dk, dv) states and reading them with q.
  if form == "parallel":
    # Scores and the weighted sum over seq_len positions, halved by the causal mask.
    forward = seq_len * (qk_dim + v_dim)
  elif form == "chunkwise":
    forward = min(chunk_size, seq_len) * (qk_dim + v_dim) + state
  else:
    forward = state
  return 3 * forward


class GroupNorm(layers.LayerNorm):
  """GroupNorm with one group per head: LayerNorm over each head's channels, then an affine map per
  channel (scale and shift of shape (heads, head_dim), not shared between heads)."""

  def __init__(self, n_head, head_dim, *, eps, dtype):
    super().__init__(head_dim, eps=eps, dtype=dtype)
    self.scale = layers.NoWeightDecay(jnp.ones((n_head, head_dim), jnp.float32), **layers.logical_axes("heads", None))
    self.bias = layers.NoWeightDecay(jnp.zeros((n_head, head_dim), jnp.float32), **layers.logical_axes("heads", None))


class MultiScaleRetention(nnx.Module):

  def __init__(self, cfg, *, dtype, rngs):
    d = cfg.d_model
    value_width = cfg.value_factor * d
    self.n_head = cfg.n_head
    self.key_dim, self.value_dim = d // cfg.n_head, value_width // cfg.n_head
    self.form, self.chunk_size, self.rope_theta = cfg.retention_form, cfg.chunk_size, cfg.rope_theta
    self.scan_impl = cfg.get("scan_impl", "chunked")
    # The paper gives no init; these are the authors' (torchscale): Xavier-uniform with gain 2^-2.5
    # into the retention, gain 1 for W_O.
    small = xavier_uniform(2**-2.5)
    self.q_proj = layers.linear(d, d, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=small)
    self.k_proj = layers.linear(d, d, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=small)
    self.v_proj = layers.linear(d, value_width, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=small)
    self.g_proj = layers.linear(d, value_width, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=small)
    self.group_norm = GroupNorm(cfg.n_head, self.value_dim, eps=cfg.norm_eps, dtype=dtype)
    self.out_proj = layers.linear(value_width, d, axes=("heads", "embed"), dtype=dtype, rngs=rngs,
                                  kernel_init=xavier_uniform(1.0))

  def init_cache(self, batch):
    return {"state": jnp.zeros((batch, self.n_head, self.key_dim, self.value_dim), jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def __call__(self, x, cache=None):
    batch, length, _ = x.shape
    start = 0 if cache is None else cache["pos"]
    positions = start + jnp.arange(length)
    heads = (batch, length, self.n_head, -1)
    q = layers.rotary(self.q_proj(x).reshape(heads), positions, self.rope_theta)
    k = layers.rotary(self.k_proj(x).reshape(heads), positions, self.rope_theta) * self.key_dim**-0.5
    v = self.v_proj(x).reshape(heads)
    o, state = retention(q, k, v, head_log_decays(self.n_head), form=self.form, chunk_size=self.chunk_size,
                         state=None if cache is None else cache["state"], chunkwise_impl=self.scan_impl)
    y = jax.nn.silu(self.g_proj(x)) * self.group_norm(o).reshape(batch, length, -1)
    if cache is not None:
      cache = {"state": state, "pos": start + length}
    return self.out_proj(y), cache


class FeedForward(nnx.Module):
  """gelu(x W_1) W_2 with the paper's width 2d; PyTorch's default init, as in the authors' code."""

  def __init__(self, cfg, *, dtype, rngs):
    hidden = cfg.ffn_factor * cfg.d_model
    self.fc1 = layers.linear(cfg.d_model, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(hidden, cfg.d_model, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class RetNetBlock(nnx.Module):

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    del layer_index
    self.retention_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.retention = MultiScaleRetention(cfg, dtype=dtype, rngs=rngs)
    self.ffn_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.ffn = FeedForward(cfg, dtype=dtype, rngs=rngs)
    self.flops = dict(form=cfg.retention_form, chunk_size=cfg.chunk_size, qk_dim=cfg.d_model,
                      v_dim=cfg.value_factor * cfg.d_model, n_head=cfg.n_head)

  @staticmethod
  def check_config(cfg):
    for key in ("value_factor", "ffn_factor"):
      if cfg[key] <= 0:
        raise UserError(f"model.{key} must be positive, got {cfg[key]}; fix the config")
    check_retention_config(cfg, cfg.d_model, cfg.value_factor * cfg.d_model)

  def init_cache(self, batch, max_length):
    del max_length  # The retention state does not grow with the sequence.
    return self.retention.init_cache(batch)

  def __call__(self, u, cache=None):
    y, cache = self.retention(self.retention_norm(u), cache)
    u = u + y.astype(jnp.float32)
    u = u + self.ffn(self.ffn_norm(u)).astype(jnp.float32)
    return u, cache

  def extra_flops_per_token(self, seq_len):
    return retention_flops_per_token(seq_len, **self.flops)


class RetNet(layers.BlockStack):
  block_class = RetNetBlock

