"""LION (Afzal et al., 2025, "Linear Attention for Efficient Bidirectional Sequence Modeling").

LION is bidirectional linear attention. Per head, with a positive feature map phi applied to the
queries and keys and a mask M with M_ii = 1:

    Y = diag(C)^-1 (phi(Q) phi(K)^T ⊙ M) V,        C_i = phi(q_i)^T sum_j M_ij phi(k_j)

so each row of the masked attention matrix is divided by its own sum. The three variants differ in
phi and M:

    LION-LIT  phi = elu + 1                  M_ij = 1                          (Katharopoulos et al.)
    LION-D    phi = l2norm(silu + 0.5)       M_ij = lambda_h^|i-j|,            lambda_h = sigmoid(a_h)
    LION-S    phi = l2norm(silu + 0.5)       M_ij = prod_{t=min(i,j)+1}^{max(i,j)} lambda_t,
                                             lambda_t = 1 - sigmoid(W_a x_t + b), one per head

M is symmetric: the weight between two tokens is the product of the decays of the tokens after the
first of them, up to and including the second. With c_t = sum_{s<=t} log lambda_s in float32,
M_ij = exp(c_i - c_j) on and below the diagonal and exp(c_j - c_i) above it; the triangle is chosen
before exponentiating, so no exponent is ever positive. LION-D is the case c_t = t log lambda_h.

The same weights compute Y in three equivalent forms (`model.lion_form`):

  "full"     the L x L masked attention matrix: the fastest to train, memory quadratic in L.
  "chunked"  the same sums accumulated over chunks of C keys: for every query, (phi(q)^T
             phi(K_[j])^T ⊙ M_[j]) [V_[j], 1] summed over the chunks j, so memory is L x C.
  "rnn"      a forward and a backward recurrence, each `kernels.linear_attention` (inference,
             O(1) state per sequence):
                 S^F_i = lambda_i S^F_{i-1} + k_i [v_i, 1]^T              (j <= i: M's lower half)
                 S^B_i = lambda_{i+1} S^B_{i+1} + k_i [v_i, 1]^T          (j >= i: M's upper half)
                 [C_i y_i, C_i] = q_i^T S^F_i + q_i^T S^B_i - (q_i^T k_i) [v_i, 1]
             The backward decay is lambda_{i+1}, not lambda_i: stepping from token i+1 back to i
             crosses the decay of token i+1, which M_ij (j > i) includes, and not that of token i,
             which it excludes. The ones column carries the normalizer C through the same scans,
             and the diagonal term, which both scans include, is subtracted once.

The encoder is BERT's with LION in place of softmax attention (the paper's MLM setup): learned
positions (the wrapper's `position_embedding="learned"`), a LayerNorm on the embeddings, then per
block (post-LN, biases everywhere, weights N(0, 0.02)):

    x = LayerNorm(x + W_o lion(W_q x, W_k x, W_v x))
    x = LayerNorm(x + W_2 gelu(W_1 x)),       W_1: d -> 4d

and finally BERT's MLM-head transform gelu(W_t x); the wrapper's final norm is that head's
LayerNorm and its tied embedding the decoder. `SequenceClassifier` instead pools the encoder's
output for a linear classification head.

The same encoder with softmax attention, softmax(Q K^T / sqrt(dk)) V over all tokens (padding keys
masked), is BERT itself: architecture "bert", the baseline the LION paper compares against.

LION models are encoders: every output sees the whole sequence, so there is no causal decoding;
`init_cache` (and so the wrapper's `prefill`/`step`) raises a UserError.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmodels import layers
from seqmodels.sharding import linear_attention
from seqmodels.errors import UserError

LION_FORMS = ("full", "chunked", "rnn")
LION_VARIANTS = ("lion_lit", "lion_d", "lion_s")


# The three forms. q and k are the feature-mapped queries and keys (batch, length, heads, dk), v is
# (batch, length, heads, dv); log_lambda is None (LION-LIT), (heads,) (LION-D) or
# (batch, length, heads) (LION-S). All three return Y (batch, length, heads, dv) in float32.


def cumulative_log_decay(log_lambda, length):
  """c_t = sum_{s<=t} log lambda_s: (batch or 1, length, heads), or None when there is no mask.

  Only differences of c enter the mask, so a constant decay takes c_t = t log lambda.
  """
  if log_lambda is None:
    return None
  if log_lambda.ndim == 1:
    return (jnp.arange(length, dtype=jnp.float32)[:, None] * log_lambda)[None]
  return jnp.cumsum(log_lambda.astype(jnp.float32), axis=1)


def log_mask(c_q, c_k, pos_q, pos_k):
  """log M between queries and keys at positions pos_q, pos_k: (batch, heads, queries, keys)."""
  diff = jnp.moveaxis(c_q, 2, 1)[..., :, None] - jnp.moveaxis(c_k, 2, 1)[..., None, :]
  return jnp.where(pos_q[:, None] >= pos_k[None, :], diff, -diff)


def _with_ones(v):
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _normalize(acc):
  """[C y, C] -> y: divides each row's numerator by its normalizer, carried in the last column."""
  return acc[..., :-1] / acc[..., -1:]


def _attend(q, k, v1, c_q, c_k, pos_q, pos_k):
  """sum_j M_ij (q_i^T k_j) v1_j over the given keys, unnormalized: (batch, queries, heads, dv1)."""
  scores = jnp.einsum("bihd,bjhd->bhij", q, k)
  if c_q is not None:
    scores = scores * jnp.exp(log_mask(c_q, c_k, pos_q, pos_k))
  return jnp.einsum("bhij,bjhd->bihd", scores, v1)


def full_form(q, k, v, log_lambda):
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  pos = jnp.arange(q.shape[1])
  c = cumulative_log_decay(log_lambda, q.shape[1])
  return _normalize(_attend(q, k, _with_ones(v), c, c, pos, pos))


def chunked_form(q, k, v, log_lambda, chunk_size):
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  batch, length, heads, _ = q.shape
  size = min(chunk_size, length)
  n_chunks = -(-length // size)
  pad = n_chunks * size - length
  pos = jnp.arange(length)
  c = cumulative_log_decay(log_lambda, length)

  def to_chunks(a, mode="constant"):
    # Padded keys have k = 0, so they add nothing; padding c with its last value keeps it
    # monotone, so their mask exponents stay <= 0 too.
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)
    return jnp.moveaxis(a.reshape(a.shape[0], n_chunks, size, *a.shape[2:]), 1, 0)

  chunks = (to_chunks(k), to_chunks(_with_ones(v)), jnp.arange(n_chunks * size).reshape(n_chunks, size),
            None if c is None else to_chunks(c, mode="edge"))

  def step(acc, chunk):
    k_j, v_j, pos_j, c_j = chunk
    return acc + _attend(q, k_j, v_j, c, c_j, pos, pos_j), None

  acc, _ = jax.lax.scan(step, jnp.zeros((batch, length, heads, v.shape[-1] + 1), jnp.float32), chunks)
  return _normalize(acc)


def backward_log_decay(log_lambda):
  """The decay of the reverse scan at step i: log lambda_{i+1} (see the module docstring).

  The last step's decay acts on the zero initial state, so its value is immaterial. A constant
  decay is its own shift.
  """
  if log_lambda is None or log_lambda.ndim == 1:
    return log_lambda
  return jnp.concatenate([log_lambda[:, 1:], jnp.zeros_like(log_lambda[:, :1])], axis=1)


def rnn_form(q, k, v, log_lambda):
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  v1 = _with_ones(v)
  # The lax.scan reference holds one (dk, dv + 1) state per head and direction: O(1) in L.
  forward = linear_attention(q, k, v1, log_lambda, impl="reference")
  backward = linear_attention(q, k, v1, backward_log_decay(log_lambda), reverse=True, impl="reference")
  diagonal = jnp.sum(q * k, axis=-1, keepdims=True) * v1
  return _normalize(forward + backward - diagonal)


def lion_attention(q, k, v, log_lambda, *, form, chunk_size):
  if form == "full":
    return full_form(q, k, v, log_lambda)
  if form == "chunked":
    return chunked_form(q, k, v, log_lambda, chunk_size)
  return rnn_form(q, k, v, log_lambda)


def lion_flops_per_token(seq_len, *, form, d_model, n_head) -> int:
  """Training flops per token of the attention itself (beyond its projections), forward + backward."""
  if form == "rnn":
    # Writing k [v, 1]^T into and reading q from a (dk, dv) state per head, in both directions.
    forward = 2 * 4 * d_model * (d_model // n_head)
  else:
    # Scores and the weighted sum over all seq_len keys, in chunks or not; nothing is halved, as
    # the mask is not causal.
    forward = 4 * seq_len * d_model
  return 3 * forward


def _feature_map(x, variant):
  if variant == "lion_lit":
    return jax.nn.elu(x) + 1
  x = jax.nn.silu(x) + 0.5
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def _decay_logit_init(n_head):
  """a_h with sigmoid(a_h) = 1 - 2^(-5-h), RetNet's per-head decays, which LION-D extends."""
  gamma = 1 - 2.0 ** (-5.0 - np.arange(n_head))
  return jnp.asarray(np.log(gamma) - np.log1p(-gamma), jnp.float32)


class LionAttention(nnx.Module):

  def __init__(self, cfg, *, dtype, rngs):
    d = cfg.d_model
    self.variant = cfg.architecture
    self.n_head, self.head_dim = cfg.n_head, d // cfg.n_head
    self.form, self.chunk_size = cfg.lion_form, cfg.chunk_size
    self.dtype = dtype
    init = layers.normal_init(0.02)
    self.qkv = layers.linear(d, 3 * d, axes=("embed", "heads"), dtype=dtype, rngs=rngs, use_bias=True, kernel_init=init)
    self.out = layers.linear(d, d, axes=("heads", "embed"), dtype=dtype, rngs=rngs, use_bias=True, kernel_init=init)
    if self.variant == "lion_d":
      self.decay_logit = nnx.Param(_decay_logit_init(cfg.n_head), **layers.logical_axes("heads"))
    if self.variant == "lion_s":
      self.decay_proj = layers.linear(d, cfg.n_head, axes=("embed", "heads"), dtype=dtype, rngs=rngs, use_bias=True,
                                      kernel_init=init)

  def log_decay(self, x):
    """log lambda: None, (heads,) or (batch, length, heads), float32."""
    if self.variant == "lion_d":
      return jax.nn.log_sigmoid(self.decay_logit[...])
    if self.variant == "lion_s":
      # log(1 - sigmoid(z)) = -softplus(z), exact where 1 - sigmoid(z) would round to 0 or 1.
      return -jax.nn.softplus(self.decay_proj(x).astype(jnp.float32))
    return None

  def __call__(self, x, mask=None):
    """x: (batch, length, d); mask: optional (batch, length), 1 for tokens and 0 for padding.

    Padding must come after the tokens. Its keys are zeroed, so it adds to no token's sums, and
    its decays are set to 1 (log 0), which changes no weight between tokens (no token pair has
    padding between them) but lets a padding row see the last token undecayed: under strong decay
    its normalizer would otherwise underflow to 0, and its 0/0 poison the next layer.
    """
    batch, length, _ = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3 * self.n_head, self.head_dim).astype(jnp.float32)
    q, k, v = jnp.split(qkv, 3, axis=2)
    if self.variant == "bert":
      key_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
      y = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
      return self.out(y.reshape(batch, length, -1).astype(self.dtype))
    q, k = _feature_map(q, self.variant), _feature_map(k, self.variant)
    log_lambda = self.log_decay(x)
    if mask is not None:
      mask = mask.astype(jnp.float32)[:, :, None]
      k = k * mask[..., None]
      if log_lambda is not None:
        log_lambda = jnp.broadcast_to(log_lambda, (batch, length, self.n_head)) * mask
    y = lion_attention(q, k, v, log_lambda, form=self.form, chunk_size=self.chunk_size)
    return self.out(y.reshape(batch, length, -1).astype(self.dtype))


class FeedForward(nnx.Module):
  """BERT's W_2 gelu(W_1 x), exact (erf) GELU, width ffn_dim (0: 4 d_model)."""

  def __init__(self, cfg, *, dtype, rngs):
    hidden = cfg.ffn_dim or 4 * cfg.d_model
    init = layers.normal_init(0.02)
    self.fc1 = layers.linear(cfg.d_model, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs, use_bias=True,
                             kernel_init=init)
    self.fc2 = layers.linear(hidden, cfg.d_model, axes=("mlp", "embed"), dtype=dtype, rngs=rngs, use_bias=True,
                             kernel_init=init)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LionBlock(nnx.Module):
  """Post-LN: u = norm(u + attention(u)); u = norm(u + ffn(u)). The stream u stays float32."""

  def __init__(self, cfg, layer_index, *, dtype, rngs):
    del layer_index
    self.attn = LionAttention(cfg, dtype=dtype, rngs=rngs)
    self.attn_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.ffn = FeedForward(cfg, dtype=dtype, rngs=rngs)
    self.ffn_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.flops = dict(form=cfg.lion_form, d_model=cfg.d_model, n_head=cfg.n_head)

  @staticmethod
  def check_config(cfg):
    if cfg.n_head <= 0 or cfg.d_model % cfg.n_head:
      raise UserError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}; "
                      "pick a head count that divides the width")
    if cfg.lion_form not in LION_FORMS:
      raise UserError(f"model.lion_form must be one of {', '.join(LION_FORMS)}, got '{cfg.lion_form}'")
    if cfg.chunk_size <= 0:
      raise UserError(f"model.chunk_size must be positive, got {cfg.chunk_size}; fix the config")

  def __call__(self, u, mask=None):
    u = self.attn_norm(u + self.attn(u, mask).astype(jnp.float32)).astype(jnp.float32)
    return self.ffn_norm(u + self.ffn(u).astype(jnp.float32)).astype(jnp.float32)

  def extra_flops_per_token(self, seq_len):
    return lion_flops_per_token(seq_len, **self.flops)


class LionEncoder(layers.BlockStack):
  """Embedding LayerNorm, the LION blocks, and BERT's MLM-head transform gelu(W_t x + b_t)."""
  block_class = LionBlock
  bidirectional = True  # Trained by masked-token or classification objectives, never causal LM.

  def __init__(self, cfg, *, dtype, rngs):
    super().__init__(cfg, dtype=dtype, rngs=rngs)
    self.embed_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
    self.mlm_transform = layers.linear(cfg.d_model, cfg.d_model, axes=("embed", None), dtype=dtype, rngs=rngs,
                                       use_bias=True, kernel_init=layers.normal_init(0.02))
    self.architecture = cfg.architecture

  def init_cache(self, batch, max_length):
    raise UserError(f"{self.architecture} is a bidirectional encoder: every output depends on the whole "
                    "sequence, so it has no causal decoding (init_cache/prefill/step); run the full "
                    "forward model(tokens) instead")

  def encode(self, u, mask=None):
    """The final hidden states (batch, length, d_model), float32; mask: 1 for tokens, 0 for padding."""
    u = self.embed_norm(u).astype(jnp.float32)
    u, _ = self.map_layers(lambda blk, u, _: (blk(u, mask), None), u)
    return u

  def __call__(self, u, cache=None):
    del cache  # Always None: init_cache refuses to make one.
    return jax.nn.gelu(self.mlm_transform(self.encode(u)), approximate=False), None


class SequenceClassifier(nnx.Module):
  """A LION encoder (a whole LanguageModel, so an MLM run's parameters load into `encoder` as they
  are) with a classification head: the mean of the encoder's final hidden states over the tokens
  (not the padding), then a linear map to the class logits."""

  def __init__(self, encoder, num_classes: int, *, dtype, rngs):
    self.encoder = encoder
    self.head = layers.linear(encoder.backbone.out_dim, num_classes, axes=("embed", None), dtype=dtype, rngs=rngs,
                              use_bias=True, kernel_init=layers.normal_init(0.02))

  def __call__(self, tokens, mask):
    """tokens: int (batch, length); mask: (batch, length), 1 for tokens then 0 for padding.

    Returns float32 logits (batch, num_classes).
    """
    model = self.encoder
    u = model.embed(tokens).astype(jnp.float32)
    if model.positions is not None:
      u = u + model.positions(jnp.arange(tokens.shape[1])).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    h = model.backbone.encode(u, mask)
    pooled = jnp.sum(h * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
    return self.head(pooled).astype(jnp.float32)
