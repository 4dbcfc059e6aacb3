"""Building blocks shared by the architectures: norms, projections, rotary embeddings, inits.

Parameters are always float32; `dtype` is the compute dtype. Norm statistics are taken in float32.
Every parameter names the logical axis of each of its dimensions (`logical_axes`): "embed" (the
residual width), "vocab", "heads" (heads x head dim, flattened or not), "mlp" (an MLP's hidden
width), "inner" (Mamba's expanded channels), or None. seqmodels/sharding.py alone decides which mesh
axes those names map to.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels._common import KERNEL_OUTPUT
from seqmodels import sharding
from seqmodels.errors import UserError

# PyTorch's nn.Linear / nn.Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The Mamba reference
# keeps it for in_proj, x_proj and conv1d, so a faithful port must too.
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
normal_init = nnx.initializers.normal


def symmetric_uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def scaled(init, factor):
  def scaled_init(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) * factor
  return scaled_init


class NoWeightDecay(nnx.Param):
  """A parameter that the optimizer must not decay, whatever its rank (Mamba's A_log and D)."""


def logical_axes(*names):
  """Variable metadata naming the logical axis of each dimension (flax's out_sharding annotation).

  Eager sharding is off: the names are not mesh axes, and sharding.py places the arrays itself.
  """
  return {"out_sharding": names, "eager_sharding": False}


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def linear(d_in, d_out, *, axes, dtype, rngs, use_bias=False, kernel_init=torch_default_init):
  """A float32 Linear whose kernel's (input, output) dimensions have the logical names `axes`."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=nnx.initializers.zeros, rngs=rngs,
                    kernel_metadata=logical_axes(*axes), bias_metadata=logical_axes(axes[1]))


def linear_pieces(linear, x, sizes):
  """linear(x) split along its outputs into pieces of `sizes`, computed as one matmul per piece.

  The same numbers as splitting linear(x), but the gradient of a split concatenates the pieces'
  cotangents into one product-sized array; here the weight is split instead and the input's
  gradient is a sum of matmuls (one activation-sized copy a Mamba layer less, kernels/NOTES.md).
  """
  pieces = np.cumsum(sizes)[:-1]
  kernels = jnp.split(linear.kernel[...].astype(linear.dtype), pieces, axis=1)
  # The module's own dot_general, which decoding may replace (generate.inference_model).
  contract_last = (((x.ndim - 1,), (0,)), ((), ()))
  outputs = [linear.dot_general(x.astype(linear.dtype), kernel, contract_last) for kernel in kernels]
  if linear.bias is not None:
    outputs = [out + bias for out, bias in zip(outputs, jnp.split(linear.bias[...].astype(linear.dtype), pieces))]
  return outputs


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 and returned in the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, axis="embed"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **logical_axes(axis))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(self.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias, computed in float32 and returned in the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, axis="embed"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **logical_axes(axis))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), **logical_axes(axis))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(self.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def check_norm(kind: str) -> None:
  if kind not in NORMS:
    raise UserError(f"model.norm must be one of {', '.join(NORMS)}, got '{kind}'")


def make_norm(kind: str, dim: int, *, eps: float, dtype):
  check_norm(kind)
  return NORMS[kind](dim, eps=eps, dtype=dtype)


class BlockStack(nnx.Module):
  """A backbone of n_layer identical blocks; subclasses name the block in `block_class`.

  A block is an nnx.Module with Block(cfg, layer_index, *, dtype, rngs), block(u, cache=None) ->
  (u, cache), block.init_cache(batch, max_length), block.extra_flops_per_token(seq_len) and
  Block.check_config(cfg).

  With model.scan_layers the blocks' parameters are stacked along a leading layer axis and the
  layers run as one lax.scan, so XLA compiles one block instead of n_layer; the stacked layout is a
  different checkpoint from the list of blocks. model.remat picks what the backward pass recomputes
  (see REMAT_POLICIES).
  """
  block_class: type
  scannable = True
  # Whether a decoding step's Linear products run kernels/decode_matmul.py on a GPU
  # (generate.inference_model): set where it measured faster than XLA's GEMMs.
  decode_matmul = False

  def __init__(self, cfg, *, dtype, rngs):
    blocks = [self.block_class(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.n_layer)]
    self.scan_layers = bool(cfg.get("scan_layers", False))
    self.remat = cfg.get("remat", "none")
    self.n_layer = cfg.n_layer
    self.out_dim = cfg.d_model
    self.arrange(blocks)

  def arrange(self, blocks):
    """Holds the blocks: stacked into one module with model.scan_layers, else as a list."""
    self.blocks = stack_modules(blocks) if self.scan_layers else nnx.List(blocks)

  @classmethod
  def check_config(cls, cfg) -> None:
    if cfg.n_layer <= 0 or cfg.d_model <= 0:
      raise UserError(f"model.n_layer ({cfg.n_layer}) and model.d_model ({cfg.d_model}) must be positive")
    cls.block_class.check_config(cfg)

  def init_cache(self, batch, max_length):
    if self.scan_layers:
      return stacked_cache(self.blocks, self.n_layer, batch, max_length)
    return [blk.init_cache(batch, max_length) for blk in self.blocks]

  def __call__(self, u, cache=None):
    if cache is None:
      u, _ = self.map_layers(lambda blk, u, _: (blk(u)[0], None), u)
      return u, None
    return self.map_layers(lambda blk, u, layer_cache: blk(u, layer_cache), u, cache)

  def map_layers(self, fn, u, per_layer=None):
    """Threads u through fn(block, u, per_layer[i]) -> (u, out_i) over the layers, under model.remat.

    per_layer and the outputs are lists of per-layer entries, or pytrees stacked on a leading layer
    axis with model.scan_layers; per_layer=None gives every layer None.
    """
    return thread_layers(self.blocks, fn, u, per_layer, scanned=self.scan_layers, remat=self.remat)

  def extra_flops_per_token(self, seq_len):
    if self.scan_layers:
      return self.n_layer * self.blocks.extra_flops_per_token(seq_len)
    return sum(blk.extra_flops_per_token(seq_len) for blk in self.blocks)


class DenseStack(BlockStack):
  """A block stack whose blocks also read what the blocks below hand up (DenseSSM's dense hidden
  connections): block(u, below, cache) -> (u, handed_up, cache), `below` the values handed up by
  the `dense` layers under it, nearest first (fewer for the first layers); cfg[dense_key] is
  `dense`.

  With model.scan_layers the first `dense` layers, which read fewer layers and so hold fewer
  parameters, stay a list (`head`); the identical layers above run as one lax.scan whose carry holds
  the last `dense` handed-up values, so XLA compiles them once instead of once per layer. A stack of
  at most `dense` layers has nothing to scan and stays a list.
  """
  dense_key: str

  def __init__(self, cfg, *, dtype, rngs):
    self.dense = cfg[self.dense_key]
    super().__init__(cfg, dtype=dtype, rngs=rngs)

  def arrange(self, blocks):
    if not self.scan_layers or len(blocks) <= self.dense:
      self.scan_layers = False
      self.blocks = nnx.List(blocks)
      return
    self.head = nnx.List(blocks[:self.dense])
    self.blocks = stack_modules(blocks[self.dense:])

  def init_cache(self, batch, max_length):
    if not self.scan_layers:
      return super().init_cache(batch, max_length)
    return ([blk.init_cache(batch, max_length) for blk in self.head],
            stacked_cache(self.blocks, self.n_layer - self.dense, batch, max_length))

  def __call__(self, u, cache=None):
    def layer(blk, carry, layer_cache):
      u, below = carry
      u, handed_up, blk_cache = blk(u, list(below), layer_cache)
      return (u, (handed_up, *below)[:self.dense]), blk_cache

    if not self.scan_layers:
      (u, _), new_cache = self.map_layers(layer, (u, ()), cache)
      return u, (None if cache is None else new_cache)
    head_cache, body_cache = (None, None) if cache is None else cache
    carry, head_cache = thread_layers(self.head, layer, (u, ()), head_cache, scanned=False, remat=self.remat)
    (u, _), body_cache = thread_layers(self.blocks, layer, carry, body_cache, scanned=True, remat=self.remat)
    return u, (None if cache is None else (head_cache, body_cache))

  def extra_flops_per_token(self, seq_len):
    if not self.scan_layers:
      return super().extra_flops_per_token(seq_len)
    return (sum(blk.extra_flops_per_token(seq_len) for blk in self.head)
            + (self.n_layer - self.dense) * self.blocks.extra_flops_per_token(seq_len))


def thread_layers(blocks, fn, carry, per_layer, *, scanned, remat):
  """Threads carry through fn(block, carry, per_layer[i]) -> (carry, out_i) over `blocks`, under
  `remat`: a list of blocks with per-layer lists, or (`scanned`) one module whose variables are
  stacked on a leading layer axis, run as one lax.scan with per_layer and the outputs stacked alike.
  per_layer=None gives every layer None.
  """
  step = checkpointed(fn, remat, prevent_cse=not scanned)
  if not scanned:
    outs = []
    for i, blk in enumerate(blocks):
      carry, out = step(blk, carry, None if per_layer is None else per_layer[i])
      outs.append(out)
    return carry, outs
  graphdef, stacked = nnx.split(blocks)

  def body(carry, layer):
    params, x = layer
    return step(nnx.merge(graphdef, params), carry, x)
  return jax.lax.scan(body, carry, (stacked, per_layer))


def stacked_cache(stacked_block, n_layer, batch, max_length):
  """The cache of n_layer stacked blocks: one block's, broadcast along a leading layer axis."""
  one = stacked_block.init_cache(batch, max_length)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n_layer, *x.shape)), one)


def stack_modules(modules):
  """One module of modules[0]'s structure whose variables stack all the modules' on a leading axis.

  Each variable is marked `stacked_layers` so that per-layer rules (weight decay on matrices only)
  look past the layer axis.
  """
  graphdef, _ = nnx.split(modules[0])
  stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(m) for m in modules)))
  for _, node in nnx.iter_graph(stacked):
    if isinstance(node, nnx.Variable):
      node.set_metadata(stacked_layers=True)
  return stacked


# What the backward pass keeps from each block's forward (model.remat); the rest it recomputes.
# "block" keeps only the block's input, "save_dots" also the outputs of its weight matmuls (not of
# attention's batched score matmuls), trading memory for about one extra forward of compute.
# "save_kernels" keeps the block's input and the outputs its backward reads from the scan kernels
# (and the fused mixer's conv kernel: kernels/_common.KERNEL_OUTPUT), which cost more to rerun
# than to keep; in a model without them it is "block". With model.scan_layers XLA stacks what it
# keeps through copies (NOTES.md, session 10), so it pays without the layer scan.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_kernels": jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUT),
}


def check_layer_options(cfg, backbone) -> None:
  """Raises UserError for a model.remat or model.scan_layers the backbone class cannot run."""
  remat = cfg.get("remat", "none")
  if remat not in REMAT_POLICIES:
    raise UserError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got '{remat}'")
  if cfg.get("scan_layers", False) and not getattr(backbone, "scannable", False):
    raise UserError(f"model.architecture '{cfg.architecture}' cannot scan its layers (they differ in shape or "
                    "read each other's states); set --config.model.scan_layers=false")


def checkpointed(fn, remat: str, *, prevent_cse: bool = True):
  """fn(module, *args) with the module's activations recomputed in the backward pass per `remat`.

  prevent_cse=False is only safe (and faster) inside lax.scan, which XLA cannot CSE across.
  """
  if remat == "none":
    return fn
  policy = REMAT_POLICIES[remat]

  def wrapped(module, *args):
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args), policy=policy,
                          prevent_cse=prevent_cse)(state, *args)
  return wrapped


def run_blocks(blocks, u, cache=None, remat="none"):
  """Runs blocks in order, each continuing from its entry of the cache list (None: training form)."""
  step = checkpointed(lambda blk, u, blk_cache: blk(u, blk_cache), remat)
  new_cache = []
  for i, blk in enumerate(blocks):
    u, blk_cache = step(blk, sharding.constrain(u, "batch", "length", "embed"), None if cache is None else cache[i])
    new_cache.append(blk_cache)
  return u, (None if cache is None else new_cache)


def pad_vocab(vocab_size: int, multiple: int) -> int:
  return int(math.ceil(vocab_size / multiple) * multiple)


def rotary(x, positions, theta: float):
  """Rotates channel pairs (i, i + d/2) of x (..., length, heads, d) by angle position * theta^(-2i/d)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., :, None] * inv_freq  # (..., length, half)
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
