"""x @ w for decoding's few rows (the batch, 1 to 256): the weight streamed through TMA into wgmma,
as a Mosaic GPU (Hopper) kernel.

A decoding step's projections multiply a (batch, k) activation by a (k, n) bf16 weight. At batch
64 the weight is 16 times the activation and the output, so the product is bound by reading the
weight once: mamba-370m's in_proj (1024 x 4096, 8.4 MB) needs 2.8 us at 3 TB/s, and XLA's split-K
GEMM plus its reduction took 10-11 us on an H100 (kernels/NOTES.md, "selective_scan_step").

One CUDA block per (tile_n output columns, one of `parts` equal slices of k) runs one warpgroup: a
pipeline of TMA copies brings x's (rows, tile_k) and w's (tile_k, tile_n) blocks into shared
memory `stages` deep, and each block pair goes into one wgmma on a float32 accumulator. Rows are
padded to a multiple of 64 (wgmma's height). With one part the block writes the output in x's
dtype; with several each writes its float32 partial sum and XLA adds the parts (a small
reduction, which it can fuse into the consumer): splitting k gives mamba-370m's out_proj (1024
columns) enough blocks to fill the 132 SMs.

Two more forms serve Mamba's decoding step at 64 rows (seqmodels/mamba.py `decode_step`,
`fuses_mamba_step`), each removing kernels of XLA's: `add_product` adds x @ w into a float32
array in place, each block's part by a TMA reduction, so that no reduction kernel follows a split
k (out_proj into the residual stream); `conv_product` is in_proj whose blocks holding the conv's
new input go on, after storing it, to the conv, its silu and their slice of x_proj, added into a
float32 sum by a TMA reduction. On an H100 they took mamba-370m from 372 to 204 kernels a
token and from 1.52 to 1.34 ms a token at batch 64, side by side (kernels/NOTES.md, "Session 14").

`dot_general` is the drop-in for `lax.dot_general` that decoding's Linear modules call
(seqmodels/generate.py `inference_model`, for backbones with `decode_matmul` set: Mamba's): it runs
this kernel for bf16 products of at most MAX_ROWS rows on one GPU when ENABLED and the sizes fit,
and `lax.dot_general` otherwise, so CPU, prefill and training never see it.

On an H100 at batch 64 (kernels/NOTES.md, "selective_scan_step" v3 and Session 13) it beats XLA's
GEMM at every projection of mamba-370m and gpt-350m run back to back as in decoding (in_proj 5.65
against 8.05 us; dispatched alone 4.2 against 6.5, 2.0 TB/s), and mamba-370m
decodes 1.604 -> 1.560 ms a token with it. gpt-350m decodes slower with it (5.99 -> 6.59 ms): its
step then holds six transposes of about 190 us, each the size of one layer's K or V cache, which
XLA does not emit with its own GEMMs; so Transformers keep XLA's.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._common import on_one_device

ENABLED = True
# Route every backbone's products, not only those that set `decode_matmul` (Mamba's): how
# gpt-350m was measured with the kernel (kernels/NOTES.md).
EVERY_MODEL = False
# Mamba's decoding step runs in_proj, the conv and x_proj as one kernel (`conv_product`) and
# out_proj adding into the residual (`add_product`): `fuses_mamba_step`.
MAMBA_STEP = True
# conv_product's blocks of z's columns prefetch the SSM state into L2 once their product is done,
# while the conv's blocks finish and the memory would idle, for the step kernel that reads it next.
PREFETCH_STATE = True
MAX_ROWS = 256  # Four wgmma heights; a float32 accumulator of 256 x 64 is 128 registers a thread.
TILE_K = 128  # Depth of a block of k: one TMA copy of x and one of w (kernels/NOTES.md: 64 was slower).
STAGES = 4  # Blocks of k in flight per CUDA block, fewer where shared memory runs out.
MIN_COLUMN_BLOCKS = 32  # With this many blocks of columns k is not split: no partial sums to add.
MIN_BLOCKS = 128  # Otherwise k is split until columns x parts reaches this (the H100 has 132 SMs).
ROW_TILE = 64  # wgmma's M.
SHARED_MEMORY = 216 * 1024  # Bytes a block may take (the H100 gives one up to 227 KB).


@functools.lru_cache(maxsize=None)
def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def column_tile(n: int) -> int:
  """Output columns per block: 64, or 32 where n is not a multiple of 64 (x_proj's rank + 2N = 96)."""
  return 64 if n % 64 == 0 else 32


def depth_tile(k: int, rows: int) -> int:
  """TILE_K, or 64 where k is not a multiple of it or x's blocks of more than 128 rows would leave
  room for fewer than 3 stages."""
  return TILE_K if k % TILE_K == 0 and rows <= 128 else 64


def split_parts(n: int, k: int, tile_n: int, tile_k: int) -> int:
  """1 for MIN_COLUMN_BLOCKS or more blocks of columns, else the fewest power-of-two parts of k
  giving MIN_BLOCKS blocks, each at least one tile_k deep."""
  parts, steps, columns = 1, k // tile_k, n // tile_n
  while columns < MIN_COLUMN_BLOCKS and columns * parts < MIN_BLOCKS and steps % (2 * parts) == 0:
    parts *= 2
  return parts


def _stages_that_fit(rows, tile_n, tile_k, dtype, reserved=None):
  """STAGES, or fewer where the buffers of 256 rows and the `reserved` bytes (by default the
  float32 output tile) exceed SHARED_MEMORY."""
  padded_rows = ROW_TILE * math.ceil(rows / ROW_TILE)
  per_stage = (padded_rows + tile_n) * tile_k * jnp.dtype(dtype).itemsize
  reserved = padded_rows * tile_n * 4 if reserved is None else reserved
  return max(1, min(STAGES, (SHARED_MEMORY - reserved) // per_stage))


def supported(k: int, n: int) -> bool:
  return k % 64 == 0 and n % 32 == 0


def _tiling(x, w, tile_n, tile_k, parts, stages):
  rows, k = x.shape
  n = w.shape[1]
  tile_n = tile_n or column_tile(n)
  tile_k = tile_k or depth_tile(k, rows)
  parts = parts or split_parts(n, k, tile_n, tile_k)
  stages = stages or _stages_that_fit(rows, tile_n, tile_k, x.dtype)
  if w.shape[0] != k or w.dtype != x.dtype or rows > MAX_ROWS:
    raise ValueError(f"decode_matmul takes x (rows <= {MAX_ROWS}, k) and w (k, n) of one dtype, "
                     f"got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
  if n % tile_n or k % (tile_k * parts):
    raise ValueError(f"decode_matmul: n={n} must be a multiple of tile_n={tile_n} and k={k} of "
                     f"tile_k x parts = {tile_k} x {parts}")
  return dict(tile_n=tile_n, tile_k=tile_k, parts=parts, stages=stages)


def _padded(x):
  rows = x.shape[0]
  return jnp.pad(x, ((0, ROW_TILE * math.ceil(rows / ROW_TILE) - rows), (0, 0)))


def matmul(x, w, *, tile_n=None, tile_k=None, parts=None, stages=None, interpret=None):
  """x (rows, k) @ w (k, n) in x's dtype, float32 accumulation; rows <= MAX_ROWS, bf16 or f16.

  The tiling defaults come from the module's constants; the benchmark passes others to compare.
  interpret: pallas's Mosaic GPU interpreter parameters, to run on CPU (the tests).
  """
  tiling = _tiling(x, w, tile_n, tile_k, parts, stages)
  partial_sums = _kernel_call(_padded(x), w, None, **tiling, interpret=interpret)
  return partial_sums.sum(axis=0).astype(x.dtype)[:x.shape[0]]


def add_product(acc, x, w, zero=None, *, tile_n=None, tile_k=None, parts=None, stages=None):
  """acc + x @ w for acc (rows, n) float32, x (rows, k) and w (k, n) as in `matmul`, rows a
  multiple of 64: each block adds its float32 product into acc's buffer by a TMA reduction, so no
  reduction kernel follows a split k, and the sum is not rounded to x's dtype. The order of the
  parts' additions varies from run to run (float32 rounding). The interpreter has no TMA
  reductions: this runs on a GPU only.

  Given zero (rows, m) float32, one block also writes zeros into its buffer, and (acc + x @ w,
  zero) is returned: Mamba's decoding step clears x_proj's accumulator for the next token so.
  """
  tiling = _tiling(x, w, tile_n, tile_k, parts, stages)
  if acc.shape != (x.shape[0], w.shape[1]) or acc.dtype != jnp.float32 or x.shape[0] % ROW_TILE:
    raise ValueError(f"add_product takes acc (rows, n) float32 with rows a multiple of {ROW_TILE}, "
                     f"got acc {acc.shape} {acc.dtype} for x {x.shape}, w {w.shape}")
  outs = _kernel_call(x, w, acc, zero=zero, **tiling, interpret=None)
  return outs[0] if zero is None else outs


def conv_product_fits(rows, k, d, width, x_proj_width, dtype) -> bool:
  """Whether `conv_product` takes these sizes with at least 2 stages of its pipeline in shared memory."""
  return (rows % ROW_TILE == 0 and rows <= MAX_ROWS and supported(k, 2 * d) and d % column_tile(2 * d) == 0
          and x_proj_width % 32 == 0
          and _conv_stages(rows, k, 2 * d, width - 1, x_proj_width, jnp.dtype(dtype)) >= 2)


def _conv_stages(rows, k, n, history, x_proj_width, dtype):
  tile_n, tile_k = column_tile(n), depth_tile(k, rows)
  itemsize = jnp.dtype(dtype).itemsize
  # xz's and x's output tiles, the conv's window and weights, x_proj's block of w and its sum.
  reserved = (2 * rows * tile_n * itemsize + history * rows * tile_n * itemsize + (history + 2) * tile_n * 4
              + tile_n * x_proj_width * itemsize + rows * x_proj_width * 4)
  return _stages_that_fit(rows, tile_n, tile_k, dtype, reserved)


def conv_product(x, w, conv_state, conv_kernel, conv_bias, x_proj_w, x_proj_sum, ssm_state=None, *,
                 interpret=None):
  """Mamba's in_proj, conv and x_proj for one token, as one kernel: xz = x @ w; the blocks of
  columns that hold the conv's new input (the first d of xz's 2d) compute u = silu(bias +
  sum_k kernel_k * window_k) over the window (conv_state's rows, then xz[:, :d]) in float32 from
  bf16 inputs, as the conv module rounds them, store it, and add u's product with their rows of
  x_proj_w into x_proj_sum by a TMA reduction.

  x (rows, k), rows a multiple of 64 (`conv_product_fits`); w (k, 2d) in x's dtype; conv_state
  (rows, width - 1, d); conv_kernel (width, d) and conv_bias (d,); x_proj_w (d, m) in x's dtype;
  x_proj_sum (rows, m) float32, zero for x_proj's product alone (`add_product` clears it).
  Returns xz, u and x_proj_sum + u @ x_proj_w. Interpreted, where there are no TMA reductions,
  each block writes its part of the product and XLA adds them.

  Given ssm_state (rows, d, n), the blocks of z's columns prefetch its channels (those of their
  columns) into L2 after their product (PREFETCH_STATE; compiled only): its reads from memory then
  overlap the conv's blocks' epilogue instead of the step kernel (mamba-370m at batch 64 on an
  H100: 1.33 -> 1.28 ms a token; the state and out_proj's weight: 1.30; kernels/NOTES.md).
  """
  rows, d = x.shape[0], conv_state.shape[2]
  history, m = conv_state.shape[1], x_proj_w.shape[1]
  if (not conv_product_fits(rows, x.shape[1], d, history + 1, m, x.dtype) or w.shape != (x.shape[1], 2 * d)
      or conv_state.shape[0] != rows or conv_kernel.shape != (history + 1, d) or x_proj_w.shape[0] != d
      or x_proj_sum.shape != (rows, m)):
    raise ValueError(f"conv_product takes x (rows, k) with rows a multiple of {ROW_TILE} that fit in shared "
                     f"memory, w (k, 2d), conv_state (rows, width - 1, d), conv_kernel (width, d), x_proj_w "
                     f"(d, m), m a multiple of 32, and x_proj_sum (rows, m), got x {x.shape}, w {w.shape}, "
                     f"conv_state {conv_state.shape}, conv_kernel {conv_kernel.shape}, x_proj_w {x_proj_w.shape}, "
                     f"x_proj_sum {x_proj_sum.shape}")
  tiling = _tiling(x, w, None, None, 1, _conv_stages(rows, x.shape[1], 2 * d, history, m, x.dtype))
  conv = (conv_state, conv_kernel.astype(jnp.float32), conv_bias.astype(jnp.float32).reshape(1, d), x_proj_w)
  if interpret is not None:
    xz, u, parts = _kernel_call(x, w, None, conv, **tiling, interpret=interpret)
    return xz, u, x_proj_sum + parts.sum(axis=0)
  if not (PREFETCH_STATE and ssm_state is not None and ssm_state.shape[:2] == (rows, d)
          and math.prod(ssm_state.shape[2:]) <= 256):
    ssm_state = None
  return _kernel_call(x, w, x_proj_sum, conv, prefetch=ssm_state, **tiling, interpret=None)


# A jit of its own, so that a decoding step's many calls of one shape lower and compile the kernel
# once (48 layers x 3 projections of mamba-370m took 64 s to compile, one lowering each).
@functools.partial(jax.jit, static_argnames=("tile_n", "tile_k", "parts", "stages", "interpret"))
def _kernel_call(x, w, acc, conv=None, zero=None, prefetch=None, *, tile_n, tile_k, parts, stages, interpret):
  """The kernel, in one of four forms:

  - x and w: (parts, rows, n) partial products of x (rows a multiple of 64), in x's dtype for
    one part;
  - with acc: (acc + x @ w,), added in place; with zero as well, (acc + x @ w, zeros);
  - with conv (conv_state, conv kernel, conv bias, x_proj's w; see `conv_product`) and acc:
    (x @ w, u, acc + u @ x_proj's w); with conv alone, the last is (blocks, rows, m)
    parts. With prefetch (rows, channels, ...) as well, the blocks past the conv's prefetch its
    channels into L2, each those of its own columns.
  """
  rows, k = x.shape
  n = w.shape[1]
  steps = k // tile_k // parts
  dtype, f32 = x.dtype, jnp.float32
  in_place = acc is not None
  out_dtype = dtype if parts == 1 and (conv is not None or not in_place) else f32
  if conv is not None:
    history, channels = conv[0].shape[1:]
    m = conv[3].shape[1]
    conv_blocks = channels // tile_n  # The blocks of columns that hold the conv's new input.
    chunk = column_tile(m)  # x_proj's columns per wgmma: its swizzle's width

  def kernel(x_gmem, w_gmem, *refs):
    refs = list(refs)
    if conv is not None:
      state_gmem, weight_gmem, bias_gmem, x_proj_gmem = refs[:4]
      refs = refs[4:]
    if prefetch is not None:
      prefetch_gmem = refs.pop(0)
    if in_place:
      acc_gmem = refs.pop(0)
    if zero is not None:
      zero_gmem = refs.pop(0)
    if conv is not None:
      out_gmem, u_gmem = refs[:2]
      if not in_place:
        acc_gmem = refs[2]
      taps_smem, weights_smem, x_proj_smem, sum_smem, barrier = refs[-5:]
    elif not in_place:
      out_gmem = refs[0]
    column = lax.axis_index("columns")
    part = lax.axis_index("parts")
    first_step = part * steps
    columns = pl.ds(column * tile_n, tile_n)
    if conv is not None:
      @pl.when(column < conv_blocks)
      def _():  # In flight while the weight streams.
        for tap in range(history):
          plgpu.copy_gmem_to_smem(state_gmem.at[:, tap, columns], taps_smem.at[tap], barrier)
        plgpu.copy_gmem_to_smem(weight_gmem.at[:, columns], weights_smem.at[pl.ds(0, history + 1)], barrier)
        plgpu.copy_gmem_to_smem(bias_gmem.at[:, columns], weights_smem.at[pl.ds(history + 1, 1)], barrier)
        for j in range(m // chunk):
          plgpu.copy_gmem_to_smem(x_proj_gmem.at[columns, pl.ds(j * chunk, chunk)], x_proj_smem.at[j], barrier)

    def accumulate_product(acc_ref):
      def step(_, x_smem, w_smem):
        plgpu.wgmma(acc_ref, x_smem, w_smem)
        # The next copy into these buffers is issued when this body returns.
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step, grid=(steps,),
          in_specs=[plgpu.BlockSpec((rows, tile_k), lambda s: (0, first_step + s)),
                    plgpu.BlockSpec((tile_k, tile_n), lambda s: (first_step + s, column))],
          max_concurrent_steps=stages)(x_gmem, w_gmem)
      return acc_ref[...]

    product = pl.run_scoped(accumulate_product, plgpu.ACC((rows, tile_n)))
    if prefetch is not None:
      # A TMA box holds at most 256 elements a dimension, and full trailing dimensions merge into
      # one (cuTensorMapEncodeTiled refused 64 channels of 16 states): a few channels a box.
      box = max(1, 256 // math.prod(prefetch.shape[2:]))

      @pl.when(column >= conv_blocks)
      def _():
        for start in range(0, tile_n, box):
          channels = pl.ds((column - conv_blocks) * tile_n + start, min(box, tile_n - start))
          plgpu.async_prefetch(prefetch_gmem.at[:, channels])

    def store(out_smem, *scoped):
      out_smem[...] = product.astype(out_smem.dtype)
      plgpu.commit_smem()
      if conv is not None:
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[:, columns])
        conv_and_x_proj(*scoped)
      elif in_place:
        plgpu.copy_smem_to_gmem(out_smem, acc_gmem.at[:, columns], reduction_op="add")
      else:
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[part, :, columns])
      if zero is not None:
        zero_rows(*scoped)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def conv_and_x_proj(u_smem):
      @pl.when(column < conv_blocks)
      def _():  # While in_proj's output is being stored.
        def weight(row):  # Rounded to the compute dtype, as the conv module rounds its weights.
          return weights_smem[row].astype(dtype).astype(f32)[None, :]
        plgpu.barrier_wait(barrier)
        # The new input as in_proj's output holds it, rounded to the compute dtype.
        pre = weight(history + 1) + weight(history) * product.astype(dtype).astype(f32)
        for tap in range(history):
          pre = pre + weight(tap) * taps_smem[tap].astype(f32)
        u_smem[...] = (pre / (1 + jnp.exp(-pre))).astype(dtype)  # silu
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(u_smem, u_gmem.at[:, columns])

        def multiply(*acc_refs):
          for j, acc_ref in enumerate(acc_refs):
            plgpu.wgmma(acc_ref, u_smem, x_proj_smem.at[j])
          plgpu.wgmma_wait(0)
          return [acc_ref[...] for acc_ref in acc_refs]

        for j, part_sum in enumerate(pl.run_scoped(multiply, *[plgpu.ACC((rows, chunk))] * (m // chunk))):
          sum_smem[:, pl.ds(j * chunk, chunk)] = part_sum
        plgpu.commit_smem()
        if in_place:
          plgpu.copy_smem_to_gmem(sum_smem, acc_gmem, reduction_op="add")
        else:
          plgpu.copy_smem_to_gmem(sum_smem, acc_gmem.at[column])

    def zero_rows(zero_smem):
      @pl.when((column == 0) & (part == 0))
      def _():
        zero_smem[...] = jnp.zeros(zero_smem.shape, f32)
        plgpu.commit_smem()
        for r in range(rows // ROW_TILE):
          plgpu.copy_smem_to_gmem(zero_smem, zero_gmem.at[pl.ds(r * ROW_TILE, ROW_TILE)])

    scoped = [plgpu.SMEM((rows, tile_n), out_dtype)]
    if conv is not None:
      scoped.append(plgpu.SMEM((rows, tile_n), dtype))
    if zero is not None:
      scoped.append(plgpu.SMEM((ROW_TILE, zero.shape[1]), f32))
    pl.run_scoped(store, *scoped)

  grid = dict(grid=(n // tile_n, parts), grid_names=("columns", "parts"),
              compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                                   approx_math=True),  # The conv's silu.
              interpret=interpret)
  operands, out_type, scratch = [x, w], [], []
  if conv is not None:
    operands += conv
    out_type = [jax.ShapeDtypeStruct((rows, n), dtype), jax.ShapeDtypeStruct((rows, channels), dtype)]
    if not in_place:
      out_type.append(jax.ShapeDtypeStruct((conv_blocks, rows, m), f32))
    scratch = [plgpu.SMEM((history, rows, tile_n), dtype), plgpu.SMEM((history + 2, tile_n), f32),
               plgpu.SMEM((m // chunk, tile_n, chunk), dtype), plgpu.SMEM((rows, m), f32),
               plgpu.Barrier(num_arrivals=history + 2 + m // chunk)]
  elif not in_place:
    out_type = [jax.ShapeDtypeStruct((parts, rows, n), out_dtype)]
  if prefetch is not None:
    operands.append(prefetch)
  # Mutable arrays: the kernel adds into acc's buffer and clears zero's, which XLA aliases to the results.
  refs = [jax.new_ref(a) for a in (acc, zero) if a is not None]
  outs = plgpu.kernel(kernel, out_type=tuple(out_type), scratch_types=scratch, **grid)(*operands, *refs)
  outs = list(outs) + [ref[...] for ref in refs]
  return outs[0] if conv is None and not in_place else tuple(outs)


def applies(lhs, rhs, dimension_numbers) -> bool:
  """Whether `dot_general` runs the kernel for this product (see the module docstring)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if not (ENABLED and _on_gpu() and on_one_device()):
    return False
  if lhs_batch or rhs_batch or rhs.ndim != 2 or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,):
    return False
  rows = math.prod(lhs.shape[:-1])
  return (0 < rows <= MAX_ROWS and lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16)
          and supported(*rhs.shape))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` that runs `matmul` for decoding's few-row products (`applies`)."""
  if applies(lhs, rhs, dimension_numbers) and preferred_element_type in (None, lhs.dtype):
    out = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def takes(linear, x) -> bool:
  """Whether a bias-free nnx.Linear's product with x (an array or its shape and dtype) may take
  the kernel's in-place forms: its products were routed here (`inference_model`), and x's rows
  are a multiple of 64."""
  contract = (((len(x.shape) - 1,), (0,)), ((), ()))
  return (linear.bias is None and linear.dot_general is dot_general and len(x.shape) == 2
          and x.shape[0] % ROW_TILE == 0 and applies(x, linear.kernel[...], contract))


def fuses_mamba_step(in_proj, x_proj, out_proj, conv_width, u) -> bool:
  """Whether Mamba's decoding step for u (rows, d_model) runs `conv_product` and `add_product`
  (seqmodels/mamba.py `decode_step`): MAMBA_STEP, all three projections `takes`, and the sizes
  fit in shared memory (64 rows for mamba-370m)."""
  inner = jax.ShapeDtypeStruct((u.shape[0], x_proj.kernel.shape[0]), u.dtype)
  return (MAMBA_STEP and takes(in_proj, u) and takes(x_proj, inner) and takes(out_proj, inner)
          and conv_product_fits(u.shape[0], u.shape[1], inner.shape[1], conv_width, x_proj.kernel.shape[1], u.dtype))
