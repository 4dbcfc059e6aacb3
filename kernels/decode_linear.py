"""A decoding step's projection, x @ w for one token of every sequence, as one Pallas kernel that
also applies the RMSNorm before it or adds the residual after it.

    normed:    y = RMSNorm(x) @ w = rms(x)^-1 ((x * scale) @ w)    (x float32: the residual stream)
    residual:  y = residual + x @ w

A decoding step reads every weight once for a few dozen rows, so a projection should stream its
weight at the memory bandwidth. XLA's GEMMs for these shapes do not (docs/generation.md: on an H100
at batch 64, mamba-370m's in_proj ran as a split-K GEMM of 7 us plus a reduction of 3 us for an 8 MB
weight, 2.8 us at 3 TB/s), and the norm and the residual add ran as kernels of their own. Here each
program multiplies a block of rows by a block of 128 weight columns (256-byte rows of a bf16
weight) over one split of the input dimension, the splits chosen so that there are about 128
programs, and adds its partial product atomically into the float32 output: the residual itself
(in its buffer) or zeros. The norm is a per-row scale, which commutes with the product and the sum
of the splits: the row's 1/rms comes from one small XLA reduction before the kernel, and each
program scales its partial product by it. Atomic float adds make the last bits of the sum depend
on the order the splits finish in.

The first version (one program per 16-32 columns looping over the whole input dimension, no
atomics) ran slower than XLA's GEMMs: 17 us for mamba-370m's norm + in_proj (kernels/NOTES.md).

The same body runs through Pallas's Triton backend on GPU and in interpret mode on CPU, where the
tests check it against a float64 reference. Triton multiplies blocks of at least 16 rows, so
`supported` asks for a power-of-two number of rows from 16 (a batch of 16 or more sequences).
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ENABLED = True  # False: decoding steps run these projections as XLA's ops (--set decode_linear.ENABLED=0).
BLOCK_ROWS = 64  # Rows per program; a larger batch runs several row blocks.
BLOCK_N = 128  # Output columns per program: 256-byte rows of a bf16 weight per load.
BLOCK_K = 64  # Input features per iteration of a program's loop.
MIN_PROGRAMS = 128  # The input dimension is split until there are this many programs.
TRITON_WARPS = 4
TRITON_STAGES = 3  # Software pipelining depth of the loop's loads.


def _is_power_of_two(k):
  return k > 0 and k & (k - 1) == 0


def _blocks(m, k, n):
  """(rows, columns, input features per step, splits of the input dimension) of a program."""
  rows, columns, block_k = min(m, BLOCK_ROWS), math.gcd(n, BLOCK_N), math.gcd(k, BLOCK_K)
  steps = k // block_k
  tiles = max(1, m // rows) * (n // columns)
  split = next((d for d in range(1, steps + 1) if steps % d == 0 and tiles * d >= MIN_PROGRAMS), steps)
  return rows, columns, block_k, split


def supported(m, k, n):
  """Whether the kernel takes an (m, k) @ (k, n) product: power-of-two row blocks of at least 16
  rows, and k and n in blocks of at least 16 (Triton's smallest product)."""
  rows, columns, block_k, _ = _blocks(m, k, n)
  return ENABLED and rows >= 16 and _is_power_of_two(rows) and m % rows == 0 and columns >= 16 and block_k >= 16


def linear(x, w, *, norm_scale=None, eps=None, residual=None, interpret=None):
  """x (m, k) @ w (k, n) in float32, with RMSNorm(x) (norm_scale, eps) first or `residual` added.

  Args:
    x: (m, k) float32 with norm_scale (the residual stream), else any float dtype.
    w: (k, n) the weight, in the compute dtype: the product's operands are rounded to it.
    norm_scale: (k,) RMSNorm's scale: the product is RMSNorm(x) @ w, with x * norm_scale rounded to
      w's dtype before the product and the row's 1/rms applied after it (a per-row scale).
    eps: RMSNorm's epsilon, with norm_scale.
    residual: (m, n) float32 that the product is added to, in its buffer.
    interpret: None runs compiled on GPU and interpreted on CPU; otherwise passed to pallas_call.

  Returns:
    (m, n) float32.
  """
  m, k = x.shape
  n = w.shape[1]
  if w.shape[0] != k or (norm_scale is not None and norm_scale.shape != (k,)) or (
      residual is not None and residual.shape != (m, n)):
    raise ValueError(f"decode_linear shapes disagree: x {x.shape}, w {w.shape}, "
                     f"norm_scale {None if norm_scale is None else norm_scale.shape}, "
                     f"residual {None if residual is None else residual.shape}")
  if norm_scale is not None and residual is not None:
    raise ValueError("decode_linear takes a norm before or a residual after the product, not both")
  if not supported(m, k, n):
    raise ValueError(f"decode_linear needs power-of-two row blocks of at least 16 rows and k and n in blocks of at "
                     f"least 16 (and decode_linear.ENABLED), got {x.shape} @ {w.shape}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  rows, columns, block_k, split = _blocks(m, k, n)
  steps = k // block_k // split
  compute = w.dtype
  normed = norm_scale is not None

  def kernel(x_ref, w_ref, *refs):
    *scale_refs, _, o_ref = refs  # The accumulator's input block is the output's buffer.
    first = pl.program_id(2) * steps

    def body(i, acc):
      offset = (first + i) * block_k
      a = x_ref[:, pl.ds(offset, block_k)]
      if normed:
        a = a.astype(jnp.float32) * scale_refs[0][0, pl.ds(offset, block_k)]
      w_block = w_ref[pl.ds(offset, block_k), :].astype(compute)
      return acc + jnp.dot(a.astype(compute), w_block, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, columns), jnp.float32))
    if normed:
      acc = acc * scale_refs[1][...]
    # The splits of the input dimension add into one output block.
    plt.atomic_add(o_ref, (slice(None), slice(None)), acc)

  from jax.experimental.pallas import triton as plt
  in_specs = [pl.BlockSpec((rows, k), lambda i, j, s: (i, 0)), pl.BlockSpec((k, columns), lambda i, j, s: (0, j))]
  args = [x, w]
  if normed:
    # The row's 1/rms, from the whole row: one small XLA reduction before the kernel.
    squares = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=1, keepdims=True)
    in_specs += [pl.BlockSpec((1, k), lambda i, j, s: (0, 0)), pl.BlockSpec((rows, 1), lambda i, j, s: (i, 0))]
    args += [norm_scale.reshape(1, k).astype(jnp.float32), jax.lax.rsqrt(squares + eps)]
  out_spec = pl.BlockSpec((rows, columns), lambda i, j, s: (i, j))
  in_specs.append(out_spec)
  args.append(jnp.zeros((m, n), jnp.float32) if residual is None else residual.astype(jnp.float32))
  params = None
  if jax.default_backend() == "gpu" and not interpret:
    params = plt.CompilerParams(num_warps=TRITON_WARPS, num_stages=TRITON_STAGES)
  return pl.pallas_call(kernel, grid=(m // rows, n // columns, split), in_specs=in_specs, out_specs=out_spec,
                        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
                        input_output_aliases={len(args) - 1: 0}, compiler_params=params, interpret=interpret)(*args)
