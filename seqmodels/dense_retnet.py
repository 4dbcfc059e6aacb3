"""DenseRetNet (He et al., 2024, "DenseMamba: State Space Models with Dense Hidden Connection for
Efficient Large Language Models"), as the authors' released code defines it.

A stack of pre-RMSNorm residual blocks of GAU-style multi-scale retention, with no FFN. Per block
l, with x = RMSNorm(u), key width d/2 and value width 2d over h heads:

    q    = silu(W_q x),  k = silu(W_k x) / sqrt(d_k)        d -> d/2 each, d_k = d/2/h
    v, g = split(silu(W_h x))                               d -> 2d + 2d

Dense hidden connections carry the raw k and v (as computed above) of the previous m layers into
this one through a selective transition, for every layer that has a previous one:

    k = RMSNorm(k + sum_{i=1..min(l, m)} silu(G_i^k(x)) * k_{l-i})
    v = RMSNorm(v + sum_{i=1..min(l, m)} silu(G_i^v(x)) * v_{l-i})
    G_i(x) = W_2 silu(W_1 x),   d -> d/32 -> d/2 (keys) or 2d (values); the projection is identity

then retention as in RetNet (rotary q and k, gamma_i = 1 - 2^(-5-i), see seqmodels/retnet.py) and

    u = u + W_o (g * RMSNorm_head(retention(q, k, v)))      2d -> d, per-head RMSNorm

The release uses one gate for all previous layers and m = 1; with m = 1 that is G_1 here. As in
seqmodels/retnet.py, the release's row normalizations of the decay mask and scores are left out:
the per-head RMSNorm after retention is invariant to them (up to its epsilon).

The backbone threads the previous m layers' raw (k, v) forward; the connections run across layers
at the same position, so a decoding step threads them the same way through one token, and the
cache holds only each block's retention state and position.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers, retnet
from seqmodels.errors import UserError

# The release's effective init: Hugging Face's post_init re-initializes every Linear with
# N(0, initializer_range = 0.02) after the modules' own Xavier reset.
INIT = layers.normal_init(0.02)


class SelectiveGate(nnx.Module):
  """G_i(x) = W_2 silu(W_1 x): d -> d/32 -> width."""

  def __init__(self, d, width, *, dtype, rngs):
    self.fc1 = layers.linear(d, d // 32, axes=("embed", None), dtype=dtype, rngs=rngs, kernel_init=INIT)
    self.fc2 = layers.linear(d // 32, width, axes=(None, "heads"), dtype=dtype, rngs=rngs, kernel_init=INIT)

  def __call__(self, x):
    return self.fc2(jax.nn.silu(self.fc1(x)))


class DenseGauRetention(nnx.Module):

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    d = cfg.d_model
    self.qk_width, self.v_width = d // 2, 2 * d
    self.n_head = cfg.n_head
    self.key_dim, self.value_dim = self.qk_width // cfg.n_head, self.v_width // cfg.n_head
    self.form, self.chunk_size, self.rope_theta = cfg.retention_form, cfg.chunk_size, cfg.rope_theta
    self.q_proj = layers.linear(d, self.qk_width, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=INIT)
    self.k_proj = layers.linear(d, self.qk_width, axes=("embed", "heads"), dtype=dtype, rngs=rngs, kernel_init=INIT)
    self.to_hidden = layers.linear(d, 2 * self.v_width, axes=("embed", "heads"), dtype=dtype, rngs=rngs,
                                   kernel_init=INIT)
    n_dense = min(layer_index, cfg.dense_layers)
    self.k_gates = nnx.List([SelectiveGate(d, self.qk_width, dtype=dtype, rngs=rngs) for _ in range(n_dense)])
    self.v_gates = nnx.List([SelectiveGate(d, self.v_width, dtype=dtype, rngs=rngs) for _ in range(n_dense)])
    # Only layers with dense inputs normalize k and v.
    self.k_norm = layers.RMSNorm(self.qk_width, eps=cfg.norm_eps, dtype=dtype, axis="heads") if n_dense else None
    self.v_norm = layers.RMSNorm(self.v_width, eps=cfg.norm_eps, dtype=dtype, axis="heads") if n_dense else None
    # One RMSNorm weight of a head's width, shared by the heads.
    self.group_norm = layers.RMSNorm(self.value_dim, eps=cfg.norm_eps, dtype=dtype, axis=None)
    self.to_out = layers.linear(self.v_width, d, axes=("heads", "embed"), dtype=dtype, rngs=rngs, kernel_init=INIT)

  def project(self, x, previous):
    """q, the densely connected k and v, the gate g, and this layer's raw (k, v) for later layers.

    previous: the raw (k, v) of layers l-1, l-2, ... (most recent first), as many as this layer has
    gates; extra entries are ignored.
    """
    q = jax.nn.silu(self.q_proj(x))
    k = jax.nn.silu(self.k_proj(x)) * self.key_dim**-0.5
    v, g = jnp.split(jax.nn.silu(self.to_hidden(x)), 2, axis=-1)
    raw = (k, v)
    if self.k_norm is not None:
      for k_gate, v_gate, (k_past, v_past) in zip(self.k_gates, self.v_gates, previous):
        k = k + jax.nn.silu(k_gate(x)) * k_past
        v = v + jax.nn.silu(v_gate(x)) * v_past
      k, v = self.k_norm(k), self.v_norm(v)
    return q, k, v, g, raw

  def init_cache(self, batch):
    return {"state": jnp.zeros((batch, self.n_head, self.key_dim, self.value_dim), jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def __call__(self, x, previous, cache=None):
    batch, length, _ = x.shape
    q, k, v, g, raw = self.project(x, previous)
    start = 0 if cache is None else cache["pos"]
    positions = start + jnp.arange(length)
    heads = (batch, length, self.n_head, -1)
    q = layers.rotary(q.reshape(heads), positions, self.rope_theta)
    k = layers.rotary(k.reshape(heads), positions, self.rope_theta)
    o, state = retnet.retention(q, k, v.reshape(heads), retnet.head_log_decays(self.n_head), form=self.form,
                                chunk_size=self.chunk_size, state=None if cache is None else cache["state"])
    y = self.to_out(g * self.group_norm(o).reshape(batch, length, -1))
    if cache is not None:
      cache = {"state": state, "pos": start + length}
    return y, raw, cache


class DenseRetNetBlock(nnx.Module):
  """u + retention(RMSNorm(u)), taking the previous layers' raw (k, v) and returning its own."""

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    self.norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.mixer = DenseGauRetention(cfg, layer_index, dtype=dtype, rngs=rngs)
    self.flops = dict(form=cfg.retention_form, chunk_size=cfg.chunk_size, qk_dim=cfg.d_model // 2,
                      v_dim=2 * cfg.d_model, n_head=cfg.n_head)

  @staticmethod
  def check_config(cfg):
    if cfg.dense_layers < 0:
      raise UserError(f"model.dense_layers must be >= 0 (0: no dense connections), got {cfg.dense_layers}")
    if cfg.d_model % 2 or cfg.d_model < 32:
      raise UserError(f"model.d_model={cfg.d_model} must be even and at least 32 (keys are d/2 wide, the "
                      "gates' hidden layer d/32); pick a larger even width")
    retnet.check_retention_config(cfg, cfg.d_model // 2, 2 * cfg.d_model)

  def init_cache(self, batch, max_length):
    del max_length  # The retention state does not grow with the sequence.
    return self.mixer.init_cache(batch)

  def __call__(self, u, previous, cache=None):
    y, raw, cache = self.mixer(self.norm(u), previous, cache)
    return u + y.astype(jnp.float32), raw, cache

  def extra_flops_per_token(self, seq_len):
    return retnet.retention_flops_per_token(seq_len, **self.flops)


class DenseRetNet(layers.DenseStack):
  """The block stack, handing each layer's raw keys and values up to the next dense_layers layers."""
  block_class = DenseRetNetBlock
  dense_key = "dense_layers"
