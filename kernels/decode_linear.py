"""A decoding step's projection, x @ w for one token of every sequence, as one Pallas kernel that
also does the RMSNorm before it or the residual add after it.

    normed:    y = (rms(x)^-1 (x * scale)) @ w = rms(x)^-1 ((x * scale) @ w)    (x float32)
    residual:  y = residual + x @ w                                             (y float32)

A decoding step reads every weight once for a few dozen rows, so each projection should stream its
weight at the memory bandwidth. XLA's GEMMs for these shapes do not (docs/generation.md: on an H100
at batch 64, mamba-370m's in_proj ran as a split-K GEMM of 7 us and a reduction of 3 us for an 8 MB
weight, 2.8 us at 3 TB/s), and the norm and the residual add each ran as a kernel of their own.
Here one program per block of output columns loops over the whole input dimension, so it holds the
full rows: it sums the squares for the norm's scale as it goes and multiplies its block of outputs
by it at the end (the norm is a per-row scale, which commutes with the product), or adds the
residual to its block. The weight is read once; x comes from L2 to every program.

The same body runs through Pallas's Triton backend on GPU and in interpret mode on CPU, where the
tests check it against a float64 reference. Triton multiplies blocks of at least 16 rows, so
`supported` asks for a power-of-two number of rows from 16 (a batch of 16 or more sequences).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_ROWS = 64  # Rows per program; a larger batch runs several row blocks.
BLOCK_K = 128  # Input features per iteration of a program's loop.
MIN_PROGRAMS = 128  # Column blocks are halved (down to 16 columns) until there are this many programs.
TRITON_WARPS = 4
TRITON_STAGES = 3  # Software pipelining depth of the loop's loads.


def _is_power_of_two(k):
  return k > 0 and k & (k - 1) == 0


def _block_rows(m):
  return min(m, BLOCK_ROWS)


def _block_columns(m, n):
  columns = 128
  while columns > 16 and (n % columns or (m // _block_rows(m)) * (n // columns) < MIN_PROGRAMS):
    columns //= 2
  return columns


def supported(m, k, n):
  """Whether the kernel takes an (m, k) @ (k, n) product: power-of-two row blocks of at least 16
  rows, and k and n in whole blocks."""
  rows = _block_rows(m)
  return (rows >= 16 and _is_power_of_two(rows) and m % rows == 0 and k % min(k, BLOCK_K) == 0
          and _is_power_of_two(min(k, BLOCK_K)) and n % _block_columns(m, n) == 0)


def linear(x, w, *, norm_scale=None, eps=None, residual=None, out_dtype=None, interpret=None):
  """x (m, k) @ w (k, n), with RMSNorm(x) (norm_scale, eps) first or `residual` added after.

  Args:
    x: (m, k) float32 with norm_scale (the residual stream), else in w's dtype.
    w: (k, n) the weight, in the compute dtype.
    norm_scale: (k,) RMSNorm's scale: the product is RMSNorm(x) @ w, x normalized in float32 and
      rounded to w's dtype before the product (rounded after the scale, before the row's 1/rms).
    eps: RMSNorm's epsilon, with norm_scale.
    residual: (m, n) float32 added to the product; the output is float32 and reuses its buffer.
    out_dtype: the output's dtype without residual; w's dtype if None.
    interpret: None runs compiled on GPU and interpreted on CPU; otherwise passed to pallas_call.
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
    raise ValueError(f"decode_linear needs power-of-two row blocks of at least 16 rows and whole blocks of k and n, "
                     f"got {x.shape} @ {w.shape}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  rows, columns, block_k = _block_rows(m), _block_columns(m, n), min(k, BLOCK_K)
  compute = w.dtype
  out_dtype = jnp.float32 if residual is not None else (out_dtype or compute)
  normed = norm_scale is not None

  def kernel(*refs):
    x_ref, w_ref = refs[:2]
    extra_ref, o_ref = (refs[2], refs[3]) if len(refs) == 4 else (None, refs[2])

    def body(i, carry):
      acc, squares = carry
      a = x_ref[:, pl.ds(i * block_k, block_k)]
      if normed:
        a = a.astype(jnp.float32)
        squares = squares + jnp.sum(a * a, axis=1)
        a = a * extra_ref[0, pl.ds(i * block_k, block_k)]
      w_block = w_ref[pl.ds(i * block_k, block_k), :].astype(compute)
      return acc + jnp.dot(a.astype(compute), w_block, preferred_element_type=jnp.float32), squares

    start = (jnp.zeros((rows, columns), jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, squares = jax.lax.fori_loop(0, k // block_k, body, start)
    if normed:
      acc = acc * jax.lax.rsqrt(squares / k + eps)[:, None]
    elif extra_ref is not None:
      acc = acc + extra_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)

  in_specs = [pl.BlockSpec((rows, k), lambda i, j: (i, 0)), pl.BlockSpec((k, columns), lambda i, j: (0, j))]
  args = [x, w]
  aliases = {}
  if normed:
    in_specs.append(pl.BlockSpec((1, k), lambda i, j: (0, 0)))
    args.append(norm_scale.reshape(1, k).astype(jnp.float32))
  elif residual is not None:
    in_specs.append(pl.BlockSpec((rows, columns), lambda i, j: (i, j)))
    args.append(residual.astype(jnp.float32))
    aliases = {2: 0}
  params = None
  if jax.default_backend() == "gpu" and not interpret:
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=TRITON_WARPS, num_stages=TRITON_STAGES)
  return pl.pallas_call(kernel, grid=(m // rows, n // columns), in_specs=in_specs,
                        out_specs=pl.BlockSpec((rows, columns), lambda i, j: (i, j)),
                        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), input_output_aliases=aliases,
                        compiler_params=params, interpret=interpret)(*args)
