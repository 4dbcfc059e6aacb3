"""DenseMamba (He et al., 2024, "DenseMamba: State Space Models with Dense Hidden Connection"):
Mamba whose SSM outputs also read the hidden states of the m layers below, at the same time step.

Per block l, with u^l = norm(block input) and x, dt, A, B, C, D, z Mamba's S6 inputs (seqmodels/mamba.py):

    h_t^l  = exp(dt_t A) h_{t-1}^l + dt_t x_t B_t             Mamba's state, its recurrence unchanged
    g_i(u) = silu(W2_i silu(W1_i u))                          d -> ceil(d / 32) -> Ed, no biases
    h'_t^l = h_t^l + sum_{i=1..m} g_i(u_t^l) * h_t^{l-i}      layers l - i < 0 are left out
    y_t^l  = (<C_t^l, h'_t^l> + D x_t^l) * silu(z_t^l)

The paper's selective transition module maps each earlier state to
phi(h_t^{l-i}) = Proj(h_t^{l-i}) * Gate(x_t^l), Gate a two-layer MLP with a SiLU activation, and its
hidden fusion module adds them: h'_t^l = h_t^l + sum_i phi(h_t^{l-i}). Here every layer's state is
(Ed, N), so Proj is the identity, and the gate has one value per channel, shared by that channel's N
state entries. The paper's x_t^l, the input of layer l, is read as the normalized block input u^l
(not the mixer's inner x), which is also what the authors' released DenseRetNet feeds its selection
MLPs; that code fixes what the paper leaves open: an MLP width of d / 32 and a SiLU on the MLP's
output. Each connection i has its own MLP g_i (that code shares one across connections), so layer l
holds min(l, m) of them; they start like Mamba's other projections (PyTorch's Linear default).

Training never forms the (batch, length, Ed, N) states. The state is linear in the layer's inputs, so
<C_t^l, h_t^{l-i}> is layer l - i's scan re-run with layer l's C (no D, no gate), and the per-channel
gate commutes with the sum over N; each layer hands its scan inputs (x, dt, A, B, dt_bias) and its
starting state to the next m layers. Decoding one token instead reads the layers' updated states from
the cache directly, as in the recurrence above; a prefill from a cache re-runs the scans from the
cached states.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from seqmodels import layers
from seqmodels.errors import UserError
from seqmodels.mamba import MambaBlock, MambaMixer
from seqmodels.sharding import selective_scan


def gate_hidden(cfg) -> int:
  return cfg.dense_gate_hidden if cfg.dense_gate_hidden > 0 else math.ceil(cfg.d_model / 32)


class ScanRecord(NamedTuple):
  """What layer l - i lends layer l: its S6 inputs, and its states before and after this forward."""
  x: jax.Array
  dt: jax.Array
  A: jax.Array
  B: jax.Array
  dt_bias: jax.Array
  h0: jax.Array | None  # None: the sequence starts here, from a zero state.
  h_last: jax.Array


class SelectionGate(nnx.Module):
  """g(u) = silu(W2 silu(W1 u)): one gate per SSM channel, from the layer's normalized input."""

  def __init__(self, d_in, hidden, d_out, *, dtype, rngs):
    self.fc1 = layers.linear(d_in, hidden, axes=("embed", None), dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(hidden, d_out, axes=(None, "inner"), dtype=dtype, rngs=rngs)

  def __call__(self, u):
    return jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(u))))


class DenseMambaMixer(MambaMixer):
  """Mamba's mixer with its output read from the fused state h'^l instead of h^l."""

  def __init__(self, cfg, n_prev, *, dtype, rngs):
    super().__init__(cfg, dtype=dtype, rngs=rngs)
    hidden = gate_hidden(cfg)
    self.gates = nnx.List([SelectionGate(cfg.d_model, hidden, self.d_inner, dtype=dtype, rngs=rngs)
                           for _ in range(n_prev)])

  def init_cache(self, batch):
    cache = super().init_cache(batch)
    del cache["x_proj_sum"]  # Only Mamba's fused decoding step (MambaMixer.decode_step) uses it.
    return cache

  def __call__(self, u, prev, cache=None):
    """u: normalized block input; prev: the records of layers l-1, l-2, ... (nearest first).

    Returns (output, this layer's record, new cache).
    """
    x, dt, A, B, C, z, conv_state = self.scan_inputs(u, None if cache is None else cache["conv"])
    h0 = None if cache is None else cache["ssm"]
    y, h_last = selective_scan(x, dt, A, B, C, self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
                               h0=h0, return_state=True, impl=self.scan_impl)
    y = (y.astype(jnp.float32) + self.dense_term(u, prev, C)) * jax.nn.silu(z.astype(jnp.float32))
    record = ScanRecord(x, dt, A, B, self.dt_bias[...], h0, h_last)
    new_cache = None if cache is None else {"conv": conv_state, "ssm": h_last}
    return self.out_proj(y.astype(self.dtype)), record, new_cache

  def dense_term(self, u, prev, C):
    """sum_i g_i(u_t) * <C_t, h_t^{l-i}> per channel: float32 (batch, length, Ed)."""
    total = jnp.zeros(C.shape[:2] + (self.d_inner,), jnp.float32)
    for gate, record in zip(self.gates, prev, strict=True):
      total = total + gate(u).astype(jnp.float32) * self._read(record, C)
    return total

  def _read(self, record, C):
    """<C_t, h_t^{l-i}> per channel, (batch, length, Ed) float32."""
    C = C.astype(jnp.float32)
    if record.h0 is not None and C.shape[1] == 1:
      # Decoding one token: layer l - i's state after it is already in hand.
      return jnp.sum(record.h_last[:, None] * C[:, :, None, :], axis=-1)
    readout = selective_scan(record.x, record.dt, record.A, record.B, C, dt_bias=record.dt_bias,
                             dt_softplus=True, h0=record.h0, impl=self.scan_impl)
    return readout.astype(jnp.float32)

  def extra_flops_per_token(self):
    # Every dense connection re-runs a scan as long as the layer's own.
    return (1 + len(self.gates)) * super().extra_flops_per_token()


class DenseMambaBlock(MambaBlock):
  """u + mixer(norm(u), records of the layers below), the residual stream in float32."""

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    self.norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    # The first layers read the fewer than m layers that exist below them.
    self.mixer = DenseMambaMixer(cfg, min(layer_index, cfg.dense_m), dtype=dtype, rngs=rngs)

  @staticmethod
  def check_config(cfg):
    if cfg.get("fused_inner", False):
      # Its mixer keeps x and dt for the layers above and gates after the dense term.
      raise UserError("model.fused_inner applies to architecture 'mamba', not 'dense_mamba'; "
                      "set model.fused_inner=False")
    MambaBlock.check_config(cfg)
    if cfg.dense_m < 1:
      raise UserError(f"model.dense_m must be >= 1 (earlier layers each layer reads), got {cfg.dense_m}; "
                      "use model.architecture='mamba' for none")
    if cfg.dense_gate_hidden < 0:
      raise UserError(f"model.dense_gate_hidden must be >= 0 (0: ceil(d_model / 32)), got {cfg.dense_gate_hidden}")

  def __call__(self, u, prev, cache=None):
    y, record, cache = self.mixer(self.norm(u), prev, cache)
    return u + y.astype(jnp.float32), record, cache


class DenseMamba(layers.DenseStack):
  """The block stack, handing each layer's scan record up to the next dense_m layers."""
  block_class = DenseMambaBlock
  dense_key = "dense_m"
