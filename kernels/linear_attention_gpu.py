"""Pallas kernels for chunked linear attention on Mosaic GPU (Hopper: H100, H200).

One CUDA block (one warpgroup) per (head, batch) walks the chunks of CHUNK steps in order, holding
the (dk, dv) float32 state in registers as a warpgroup-matmul (wgmma) accumulator. Per chunk:

  scores = (q k^T) * exp(c_t - c_s) [s <= t]        o = scores v + (q * exp(c)) S
  S <- exp(c_last) * S + (k * exp(c_last - c))^T v

with c the log-decay summed from the chunk's start (kernels/linear_attention_pallas.py computes
it). Operands of the matmuls are bfloat16 (the state too, for the q S product), accumulation is
float32. The next chunk's q, k, v and c are copied in by TMA while the current one is computed.

With one log-decay per key channel the decay cannot leave the dk sum, so the intra-chunk scores
come from q * exp(c) against k * exp(-c). That factorisation needs exp(-c) to stay finite: the
channel's log-decay summed over one chunk must stay above about -80 (float32 and bfloat16 range);
the XLA and TPU paths have no such limit.

The backward kernel walks the chunks in reverse from the chunk-start states the forward saved,
carrying the state's gradient dS the same way.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 64
_BF16 = jnp.bfloat16
_F32 = jnp.float32
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # A (m,) vector laid out to broadcast along a matrix's rows.
_COLS = plgpu.Layout.WGMMA.reduce(0)  # A (n,) vector laid out to broadcast along its columns.


def unsupported_reason(dk, dv):
  """Why the kernels cannot take these head widths, or None when they can."""
  if dk not in (64, 128) or dv not in (64, 128):
    return f"key and value head widths of 64 or 128 (got dk={dk}, dv={dv})"
  return None


def _tiled(shape, dtype=_BF16):
  """SMEM laid out as wgmma reads it: 128-byte swizzle over (8, 128 bytes) tiles."""
  swizzle_elems = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle_elems)),
                                              plgpu.SwizzleTransform(128)))


def _present(**scratch):
  """The scratch buffers this variant of a kernel uses (those not None)."""
  return {name: value for name, value in scratch.items() if value is not None}


def _matmul(terms, shape):
  """sum of a @ b over terms (pairs of SMEM refs or bf16 WGMMA arrays), in float32."""

  def body(acc_ref):
    for a, b in terms:
      plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, _F32))


def _rows(vector, shape):
  """vector[i] in every column of row i. The layout casts guide Mosaic's layout inference."""
  vector = plgpu.layout_cast(vector, _ROWS)
  return plgpu.layout_cast(lax.broadcast_in_dim(vector, shape, [0]), plgpu.Layout.WGMMA)


def _cols(vector, shape):
  """vector[j] in every row of column j."""
  vector = plgpu.layout_cast(vector, _COLS)
  return plgpu.layout_cast(lax.broadcast_in_dim(vector, shape, [1]), plgpu.Layout.WGMMA)


def _causal(shape, transposed=False):
  """[s <= t] for a (t, s) matrix, or for its transpose (s, t)."""
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  return cols >= rows if transposed else rows >= cols


class _Chunk:
  """The log-decay of one chunk in the layouts the kernels need, and the factors made from it.

  Each layout is loaded from its own SMEM copy: two loads of one buffer would be merged into one
  value, which cannot take both layouts.
  """

  def __init__(self, refs, per_channel):
    self.per_channel = per_channel
    if per_channel:
      self.c = plgpu.load(refs["c"], layout=plgpu.Layout.WGMMA)  # (size, dk)
      self.c_last_rows = plgpu.load(refs["c_last_rows"], layout=_ROWS)  # (dk,), for the state
      self.c_last_cols = plgpu.load(refs["c_last_cols"], layout=_COLS)  # for (size, dk)
    else:
      self.c_rows = plgpu.load(refs["c_rows"], layout=_ROWS)  # (size,)
      self.c_cols = plgpu.load(refs["c_cols"], layout=_COLS)
      self.c_last = refs["c_rows"][CHUNK - 1]

  def scale_rows(self, x, exponent_of_c):
    """x (size, dk) times exp(f(c)) with f given for c and c_last by exponent_of_c."""
    if self.per_channel:
      return x * jnp.exp(exponent_of_c(self.c, _cols(self.c_last_cols, x.shape)))
    return x * _rows(jnp.exp(exponent_of_c(self.c_rows, self.c_last)), x.shape)

  def decay_matrix(self, transposed=False):
    """exp(c_t - c_s) for s <= t else 0, as (t, s) or transposed (s, t); one decay per step."""
    shape = (CHUNK, CHUNK)
    later = _rows(self.c_rows, shape) if not transposed else _cols(self.c_cols, shape)
    earlier = _cols(self.c_cols, shape) if not transposed else _rows(self.c_rows, shape)
    return jnp.exp(jnp.where(_causal(shape, transposed), later - earlier, -jnp.inf))

  def state_decay(self, x):
    """exp(c_last) times the (dk, dv) state x, row k by channel k's decay."""
    if self.per_channel:
      return x * _rows(jnp.exp(self.c_last_rows), x.shape)
    return x * jnp.exp(self.c_last)


def _c_scratch(per_channel, dk, n_slots=None):
  """SMEM for one chunk's c (per slot when n_slots is given), by name."""
  if per_channel:
    shapes = {"c": (CHUNK, dk), "c_last_rows": (dk,), "c_last_cols": (dk,)}
  else:
    shapes = {"c_rows": (CHUNK,), "c_cols": (CHUNK,)}
  lead = () if n_slots is None else (n_slots,)
  return {name: plgpu.SMEM(lead + shape, _F32) for name, shape in shapes.items()}


def _copy_c(c_ref, c_last_ref, b, h, j, refs, barriers, first):
  """Starts the TMA copies of chunk j's c into refs, one barrier each from barriers[first]."""
  steps = pl.ds(j * CHUNK, CHUNK)
  for i, (name, ref) in enumerate(refs.items()):
    if name == "c":
      source = c_ref.at[b, steps, h]
    elif name.startswith("c_last"):
      source = c_last_ref.at[b, h, j]
    else:
      source = c_ref.at[b, h, steps]
    plgpu.copy_gmem_to_smem(source, ref, barriers.at[first + i])


def _wait_c(refs, barriers, first):
  for i in range(len(refs)):
    plgpu.barrier_wait(barriers.at[first + i])


def _prepare_c(c):
  """c as the kernels read it, plus c_last: per-step c moves to (batch, heads, length) so that
  one chunk of it is a contiguous TMA copy; per-channel c keeps its layout."""
  batch, length, heads, dg = c.shape
  c_last = c.reshape(batch, length // CHUNK, CHUNK, heads, dg)[:, :, -1].transpose(0, 2, 1, 3)
  if dg == 1:
    return jnp.transpose(c[..., 0], (0, 2, 1)), c_last
  return c, c_last


def _store_final_state(staging, value, destination):
  """Writes a kernel's last (dk, dv) float32 value to HBM through `staging`, once the chunk loop's
  own stores out of it have left."""
  plgpu.wait_smem_to_gmem(0)
  staging[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(staging, destination)
  plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, c, h0, *, chunk_size, interpret):
  """o (bf16), the final state and the (batch, heads, chunks, dk, dv) chunk-start states."""
  del chunk_size  # Always CHUNK here.
  q, k, v = (x.astype(_BF16) for x in (q, k, v))
  batch, length, heads, dk = q.shape
  dv, per_channel = v.shape[-1], c.shape[-1] > 1
  n_chunks = length // CHUNK
  c, c_last = _prepare_c(c)
  # Two slots let TMA fill the next chunk during this one; per-channel c leaves SMEM for one.
  n_slots = 1 if per_channel else 2
  kernel = plgpu.kernel(
      functools.partial(_forward_kernel, per_channel=per_channel, n_chunks=n_chunks,
                        n_slots=n_slots),
      out_type=(jax.ShapeDtypeStruct((batch, length, heads, dv), _BF16),
                jax.ShapeDtypeStruct((batch, heads, dk, dv), _F32),
                jax.ShapeDtypeStruct((batch, heads, n_chunks, dk, dv), _F32)),
      scratch_types=_present(
          q=_tiled((n_slots, CHUNK, dk)), k=_tiled((n_slots, CHUNK, dk)),
          v=_tiled((n_slots, CHUNK, dv)), **_c_scratch(per_channel, dk, n_slots),
          k_decayed=_tiled((CHUNK, dk)), k_grown=_tiled((CHUNK, dk)) if per_channel else None,
          state=_tiled((dk, dv)), o=_tiled((CHUNK, dv)), state_f32=plgpu.SMEM((dk, dv), _F32),
          barriers=plgpu.Barrier(num_barriers=6 * n_slots + 1)),
      grid=(heads, batch), grid_names=("heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  return kernel(q, k, v, c, c_last, h0)


def _forward_kernel(q_ref, k_ref, v_ref, c_ref, c_last_ref, h0_ref, o_ref, s_last_ref, states_ref,
                    *, per_channel, n_chunks, n_slots, **scratch):
  h, b = lax.axis_index("heads"), lax.axis_index("batch")
  dk = q_ref.shape[-1]
  bars = scratch["barriers"]
  c_names = tuple(_c_scratch(per_channel, dk))
  c_slot = lambda slot: {name: scratch[name].at[slot] for name in c_names}
  # Barriers: q, k, v and up to three for c, for each slot; then h0.

  def fetch(j, slot):
    steps = pl.ds(j * CHUNK, CHUNK)
    base = 6 * slot
    plgpu.copy_gmem_to_smem(q_ref.at[b, steps, h], scratch["q"].at[slot], bars.at[base])
    plgpu.copy_gmem_to_smem(k_ref.at[b, steps, h], scratch["k"].at[slot], bars.at[base + 1])
    plgpu.copy_gmem_to_smem(v_ref.at[b, steps, h], scratch["v"].at[slot], bars.at[base + 2])
    _copy_c(c_ref, c_last_ref, b, h, j, c_slot(slot), bars, base + 3)

  def wait(slot):
    for i in range(3):
      plgpu.barrier_wait(bars.at[6 * slot + i])
    _wait_c(c_names, bars, 6 * slot + 3)

  state_f32 = scratch["state_f32"]
  plgpu.copy_gmem_to_smem(h0_ref.at[b, h], state_f32, bars.at[6 * n_slots])
  plgpu.barrier_wait(bars.at[6 * n_slots])
  s = plgpu.load(state_f32, layout=plgpu.Layout.WGMMA)
  if n_slots == 2:
    fetch(0, 0)

  def step(j, s):
    slot = lax.rem(j, n_slots)
    # Every read of the slot about to be filled (by the tensor cores and by threads) finished in
    # the last step.
    plgpu.commit_smem()
    if n_slots == 2:
      @pl.when(j + 1 < n_chunks)
      def _():
        fetch(j + 1, 1 - slot)
    else:
      fetch(j, slot)

    wait(slot)
    q_smem, k_smem, v_smem = (scratch[n].at[slot] for n in ("q", "k", "v"))
    decay = _Chunk(c_slot(slot), per_channel)
    plgpu.wait_smem_to_gmem(0)  # Last step's stores out of o and state_f32 are done.
    scratch["state"][...] = s.astype(_BF16)
    state_f32[...] = s
    q_decayed = decay.scale_rows(plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(_F32),
                                 lambda c, c_last: c)
    k = plgpu.load(k_smem, layout=plgpu.Layout.WGMMA).astype(_F32)
    scratch["k_decayed"][...] = decay.scale_rows(k, lambda c, c_last: c_last - c).astype(_BF16)
    if per_channel:
      scratch["k_grown"][...] = decay.scale_rows(k, lambda c, c_last: -c).astype(_BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_f32, states_ref.at[b, h, j])

    q_bf16 = q_decayed.astype(_BF16)
    if per_channel:
      scores = _matmul([(q_bf16, scratch["k_grown"].transpose((1, 0)))], (CHUNK, CHUNK))
      scores = jnp.where(_causal(scores.shape), scores, 0.0)
    else:
      scores = _matmul([(q_smem, k_smem.transpose((1, 0)))], (CHUNK, CHUNK))
      scores = scores * decay.decay_matrix()
    o = _matmul([(scores.astype(_BF16), v_smem), (q_bf16, scratch["state"])], (CHUNK, v_ref.shape[-1]))
    s = decay.state_decay(s) + _matmul([(scratch["k_decayed"].transpose((1, 0)), v_smem)], s.shape)
    scratch["o"][...] = o.astype(_BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(scratch["o"], o_ref.at[b, pl.ds(j * CHUNK, CHUNK), h])
    return s

  s = lax.fori_loop(0, n_chunks, step, s)
  _store_final_state(state_f32, s, s_last_ref.at[b, h])


def backward(q, k, v, c, states, do, ds_last, *, chunk_size, interpret):
  """Gradients (dq, dk, dv, dc, dh0) of the forward kernel's (o, s_last) given theirs."""
  del chunk_size
  dtypes = (q.dtype, k.dtype, v.dtype)
  q, k, v, do = (x.astype(_BF16) for x in (q, k, v, do))
  batch, length, heads, dk = q.shape
  dv, dg = v.shape[-1], c.shape[-1]
  per_channel = dg > 1
  n_chunks = length // CHUNK
  c, c_last = _prepare_c(c)
  dc_shape = (batch, length, heads, dk) if per_channel else (batch, heads, length)
  kernel = plgpu.kernel(
      functools.partial(_backward_kernel, per_channel=per_channel, n_chunks=n_chunks),
      out_type=(jax.ShapeDtypeStruct((batch, length, heads, dk), _BF16),
                jax.ShapeDtypeStruct((batch, length, heads, dk), _BF16),
                jax.ShapeDtypeStruct((batch, length, heads, dv), _BF16),
                jax.ShapeDtypeStruct(dc_shape, _F32),
                jax.ShapeDtypeStruct((batch, heads, dk, dv), _F32)),
      scratch_types=_present(
          q=_tiled((CHUNK, dk)), k=_tiled((CHUNK, dk)), v=_tiled((CHUNK, dv)),
          do=_tiled((CHUNK, dv)), **_c_scratch(per_channel, dk),
          state=_tiled((dk, dv)), d_state=_tiled((dk, dv)), state_f32=plgpu.SMEM((dk, dv), _F32),
          q_decayed=_tiled((CHUNK, dk)), k_grown=_tiled((CHUNK, dk)) if per_channel else None,
          extra=plgpu.SMEM((dk,), _F32),
          barriers=plgpu.Barrier(num_barriers=9)),
      grid=(heads, batch), grid_names=("heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  dq, dk_, dv_, dc, dh0 = kernel(q, k, v, c, c_last, states, do, ds_last)
  if not per_channel:
    dc = jnp.transpose(dc, (0, 2, 1))[..., None]
  dq, dk_, dv_ = (x.astype(t) for x, t in zip((dq, dk_, dv_), dtypes))
  return dq, dk_, dv_, dc, dh0


def _backward_kernel(q_ref, k_ref, v_ref, c_ref, c_last_ref, states_ref, do_ref, ds_last_ref,
                     dq_ref, dk_ref, dv_ref, dc_ref, dh0_ref, *, per_channel, n_chunks, **scratch):
  h, b = lax.axis_index("heads"), lax.axis_index("batch")
  dk, dv = q_ref.shape[-1], v_ref.shape[-1]
  bars = scratch["barriers"]
  wgmma = plgpu.Layout.WGMMA
  state_f32 = scratch["state_f32"]
  c_refs = {name: scratch[name] for name in _c_scratch(per_channel, dk)}
  # Barriers: q, k, v, do, the chunk-start state, up to three for c; then dS_last.
  plgpu.copy_gmem_to_smem(ds_last_ref.at[b, h], state_f32, bars.at[8])
  plgpu.barrier_wait(bars.at[8])
  ds = plgpu.load(state_f32, layout=wgmma)

  def step(i, ds):
    j = n_chunks - 1 - i
    steps = pl.ds(j * CHUNK, CHUNK)
    plgpu.wait_smem_to_gmem(0)  # The previous chunk's gradients have left SMEM.
    plgpu.commit_smem()
    for n, (ref, bar) in enumerate(((q_ref, "q"), (k_ref, "k"), (v_ref, "v"), (do_ref, "do"))):
      plgpu.copy_gmem_to_smem(ref.at[b, steps, h], scratch[bar], bars.at[n])
    plgpu.copy_gmem_to_smem(states_ref.at[b, h, j], state_f32, bars.at[4])
    _copy_c(c_ref, c_last_ref, b, h, j, c_refs, bars, 5)
    for n in range(5):
      plgpu.barrier_wait(bars.at[n])
    _wait_c(c_refs, bars, 5)

    decay = _Chunk(c_refs, per_channel)
    q = plgpu.load(scratch["q"], layout=wgmma).astype(_F32)
    k = plgpu.load(scratch["k"], layout=wgmma).astype(_F32)
    s = plgpu.load(state_f32, layout=wgmma)
    scratch["state"][...] = s.astype(_BF16)
    scratch["d_state"][...] = ds.astype(_BF16)
    q_decayed = decay.scale_rows(q, lambda c, c_last: c)
    k_decayed = decay.scale_rows(k, lambda c, c_last: c_last - c)
    scratch["q_decayed"][...] = q_decayed.astype(_BF16)
    if per_channel:
      k_grown = decay.scale_rows(k, lambda c, c_last: -c)
      scratch["k_grown"][...] = k_grown.astype(_BF16)
    plgpu.commit_smem()

    q_smem, k_smem, v_smem, do_smem = (scratch[n] for n in ("q", "k", "v", "do"))
    square = (CHUNK, CHUNK)
    transpose = lambda ref: ref.transpose((1, 0))
    # Scores and their gradient, each also transposed, so that every product below has its
    # (size, size) operand in registers, as wgmma's left operand.
    if per_channel:
      scores_t = _matmul([(k_grown.astype(_BF16), transpose(scratch["q_decayed"]))], square)
      scores_t = jnp.where(_causal(square, transposed=True), scores_t, 0.0)
    else:
      scores_t = _matmul([(k_smem, transpose(q_smem))], square) * decay.decay_matrix(True)
    d_scores = _matmul([(do_smem, transpose(v_smem))], square)
    d_scores_t = _matmul([(v_smem, transpose(do_smem))], square)
    if per_channel:
      d_scores = jnp.where(_causal(square), d_scores, 0.0).astype(_BF16)
      d_scores_t = jnp.where(_causal(square, transposed=True), d_scores_t, 0.0).astype(_BF16)
      dq = decay.scale_rows(_matmul([(d_scores, scratch["k_grown"]),
                                     (do_smem, transpose(scratch["state"]))], (CHUNK, dk)),
                            lambda c, c_last: c)
      dk_intra = decay.scale_rows(_matmul([(d_scores_t, scratch["q_decayed"])], (CHUNK, dk)),
                                  lambda c, c_last: -c)
    else:
      d_scores = (d_scores * decay.decay_matrix()).astype(_BF16)
      d_scores_t = (d_scores_t * decay.decay_matrix(True)).astype(_BF16)
      dq = (_matmul([(d_scores, k_smem)], (CHUNK, dk))
            + decay.scale_rows(_matmul([(do_smem, transpose(scratch["state"]))], (CHUNK, dk)),
                               lambda c, c_last: c))
      dk_intra = _matmul([(d_scores_t, q_smem)], (CHUNK, dk))
    dk_inter = decay.scale_rows(_matmul([(v_smem, transpose(scratch["d_state"]))], (CHUNK, dk)),
                                lambda c, c_last: c_last - c)
    dv_ = _matmul([(scores_t.astype(_BF16), do_smem),
                   (k_decayed.astype(_BF16), scratch["d_state"])], (CHUNK, dv))
    dk_ = dk_intra + dk_inter

    # dc = q dq - k dk, and c_last also scales the carried state and every key of the chunk.
    # The state's row sums come out laid out along rows; SMEM turns them into a column layout.
    scratch["extra"][...] = jnp.sum(decay.state_decay(s * ds), axis=1)
    plgpu.commit_smem()
    extra = plgpu.load(scratch["extra"], layout=_COLS) + jnp.sum(k * dk_inter, axis=0)
    rows = plgpu.broadcasted_iota(jnp.int32, (CHUNK, dk), 0, layout=wgmma)
    dc = q * dq - k * dk_ + jnp.where(rows == CHUNK - 1, _cols(extra, (CHUNK, dk)), 0.0)
    if not per_channel:
      dc = jnp.sum(dc, axis=1)

    ds = decay.state_decay(ds) + _matmul([(transpose(scratch["q_decayed"]), do_smem)], ds.shape)
    # The gradients leave through the SMEM of the inputs they match, whose reads are all done.
    dc_smem = scratch["c" if per_channel else "c_rows"]
    for name, value in (("q", dq), ("k", dk_), ("v", dv_)):
      scratch[name][...] = value.astype(_BF16)
    dc_smem[...] = dc
    plgpu.commit_smem()
    for name, ref in (("q", dq_ref), ("k", dk_ref), ("v", dv_ref)):
      plgpu.copy_smem_to_gmem(scratch[name], ref.at[b, steps, h])
    plgpu.copy_smem_to_gmem(dc_smem, dc_ref.at[b, steps, h] if per_channel else dc_ref.at[b, h, steps])
    return ds

  ds = lax.fori_loop(0, n_chunks, step, ds)
  _store_final_state(state_f32, ds, dh0_ref.at[b, h])
