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

The backward kernel walks the chunks in reverse from the chunk-start states the forward saved (in
bf16, the operand precision of its matmuls), carrying the state's gradient dS the same way. Its
buffers fit two blocks on an SM at the benchmark's shape, and it issues the products that depend
only on the loaded chunk together, waiting once.
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


def _matmuls(*products):
  """start + sum(a @ b over terms), in float32, for each (start, terms) of products: start is a
  float32 WGMMA array or the shape of zeros, terms pairs of SMEM refs or bf16 WGMMA arrays. Every
  wgmma is issued back to back and all are waited for once."""

  def body(acc_refs):
    for acc_ref, (_, terms) in zip(acc_refs, products):
      for a, b in terms:
        plgpu.wgmma(acc_ref, a, b)

  starts = tuple(plgpu.ACC.init(plgpu.layout_cast(jnp.zeros(start, _F32), plgpu.Layout.WGMMA)
                                if isinstance(start, tuple) else start) for start, _ in products)
  return pl.run_state(body)(starts)


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
  """o (bf16), the final state and the (batch, heads, chunks, dk, dv) chunk-start states, in bf16
  (the backward's matmuls read them in bf16)."""
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
                jax.ShapeDtypeStruct((batch, heads, n_chunks, dk, dv), _BF16)),
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
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # Last step's stores have read o and state.
    scratch["state"][...] = s.astype(_BF16)
    q_decayed = decay.scale_rows(plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(_F32),
                                 lambda c, c_last: c)
    k = plgpu.load(k_smem, layout=plgpu.Layout.WGMMA).astype(_F32)
    scratch["k_decayed"][...] = decay.scale_rows(k, lambda c, c_last: c_last - c).astype(_BF16)
    if per_channel:
      scratch["k_grown"][...] = decay.scale_rows(k, lambda c, c_last: -c).astype(_BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(scratch["state"], states_ref.at[b, h, j])

    q_bf16 = q_decayed.astype(_BF16)
    if per_channel:
      (scores,) = _matmuls(((CHUNK, CHUNK), [(q_bf16, scratch["k_grown"].transpose((1, 0)))]))
      scores = jnp.where(_causal(scores.shape), scores, 0.0)
    else:
      (scores,) = _matmuls(((CHUNK, CHUNK), [(q_smem, k_smem.transpose((1, 0)))]))
      scores = scores * decay.decay_matrix()
    o, s = _matmuls(((CHUNK, v_ref.shape[-1]), [(scores.astype(_BF16), v_smem), (q_bf16, scratch["state"])]),
                    (decay.state_decay(s), [(scratch["k_decayed"].transpose((1, 0)), v_smem)]))
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
  # 103.5 KB at dk 128, dv 64 with one decay per step: two blocks share an SM, one computing
  # while the other waits on its loads and matmuls.
  chunk_buffers = _present(
      q=_tiled((CHUNK, dk)), k=_tiled((CHUNK, dk)), v=_tiled((CHUNK, dv)),
      do=_tiled((CHUNK, dv)), **_c_scratch(per_channel, dk),
      state=_tiled((dk, dv)), d_state=_tiled((dk, dv)), decayed=_tiled((CHUNK, dk)),
      k_grown=_tiled((CHUNK, dk)) if per_channel else None, extra=plgpu.SMEM((dk,), _F32))
  kernel = plgpu.kernel(
      functools.partial(_backward_kernel, per_channel=per_channel, n_chunks=n_chunks,
                        chunk_buffers=chunk_buffers),
      out_type=(jax.ShapeDtypeStruct((batch, length, heads, dk), _BF16),
                jax.ShapeDtypeStruct((batch, length, heads, dk), _BF16),
                jax.ShapeDtypeStruct((batch, length, heads, dv), _BF16),
                jax.ShapeDtypeStruct(dc_shape, _F32),
                jax.ShapeDtypeStruct((batch, heads, dk, dv), _F32)),
      scratch_types=dict(barriers=plgpu.Barrier(num_barriers=9)),
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
                     dq_ref, dk_ref, dv_ref, dc_ref, dh0_ref, *, per_channel, n_chunks,
                     chunk_buffers, barriers):
  h, b = lax.axis_index("heads"), lax.axis_index("batch")
  dk, dv = q_ref.shape[-1], v_ref.shape[-1]
  staging = plgpu.SMEM((dk, dv), _F32)
  # dS_last comes in and dh0 leaves through float32 staging that shares its SMEM with the chunk
  # loop's buffers (sequential scopes reuse SMEM).

  def load_ds_last(staging_ref):
    plgpu.copy_gmem_to_smem(ds_last_ref.at[b, h], staging_ref, barriers.at[8])
    plgpu.barrier_wait(barriers.at[8])
    return plgpu.load(staging_ref, layout=plgpu.Layout.WGMMA)

  ds = pl.run_scoped(load_ds_last, staging)
  ds = pl.run_scoped(
      functools.partial(_backward_chunks, (q_ref, k_ref, v_ref, c_ref, c_last_ref, states_ref,
                                           do_ref), (dq_ref, dk_ref, dv_ref, dc_ref), ds,
                        barriers, per_channel=per_channel, n_chunks=n_chunks, b=b, h=h),
      **chunk_buffers)
  pl.run_scoped(lambda staging_ref: _store_final_state(staging_ref, ds, dh0_ref.at[b, h]), staging)


def _backward_chunks(in_refs, out_refs, ds, bars, *, per_channel, n_chunks, b, h, **scratch):
  """The chunks in reverse; ds, the state's gradient, enters as dS_last and leaves as dh0.

  Per chunk, with D the decay matrix exp(c_t - c_s) [s <= t] and dS the gradient of the state
  leaving the chunk (one decay per step; per key channel the decays factor as in the forward):
    dq = (do v^T * D) k + (do e^c) S^T          dk = (v do^T * D^T) q + dk_inter,
    dv = (k q^T * D^T) do + (k e^(c_last - c)) dS      dk_inter = (v e^(c_last - c)) dS^T
    dS <- e^c_last dS + (q e^c)^T do
  and the gradient of c: q dq - k dk, plus, at the last step, the c_last term
  sum(e^c_last S * dS) + sum over steps of k * dk_inter. The second sum takes the very dk_inter
  that dk holds, so that the two cancel as they should (through any other rounding of the same
  quantity, the state leaving the chunk, dlog_decay's error grew from 2e-3 to 7e-3 on the GPU).
  """
  q_ref, k_ref, v_ref, c_ref, c_last_ref, states_ref, do_ref = in_refs
  dq_ref, dk_ref, dv_ref, dc_ref = out_refs
  dk, dv = q_ref.shape[-1], v_ref.shape[-1]
  wgmma = plgpu.Layout.WGMMA
  c_refs = {name: scratch[name] for name in _c_scratch(per_channel, dk)}
  q_smem, k_smem, v_smem, do_smem = (scratch[n] for n in ("q", "k", "v", "do"))
  state, d_state, decayed = scratch["state"], scratch["d_state"], scratch["decayed"]
  transpose = lambda ref: ref.transpose((1, 0))
  load = lambda ref: plgpu.load(ref, layout=wgmma).astype(_F32)
  square = (CHUNK, CHUNK)
  # Barriers: q, k, v, do, the chunk-start state, up to three for c; (8: dS_last).

  def step(i, ds):
    j = n_chunks - 1 - i
    steps = pl.ds(j * CHUNK, CHUNK)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # The last chunk's gradients have left SMEM.
    plgpu.commit_smem()
    for n, (ref, smem) in enumerate(((q_ref, q_smem), (k_ref, k_smem), (v_ref, v_smem),
                                     (do_ref, do_smem))):
      plgpu.copy_gmem_to_smem(ref.at[b, steps, h], smem, bars.at[n])
    plgpu.copy_gmem_to_smem(states_ref.at[b, h, j], state, bars.at[4])
    _copy_c(c_ref, c_last_ref, b, h, j, c_refs, bars, 5)
    for n in range(5):
      plgpu.barrier_wait(bars.at[n])
    _wait_c(c_refs, bars, 5)

    decay = _Chunk(c_refs, per_channel)
    ds_decayed = decay.state_decay(ds)
    # The state's part of the c_last term, by key channel; SMEM turns its row layout into columns.
    scratch["extra"][...] = jnp.sum(load(state) * ds_decayed, axis=1)
    # Per key channel, e^c_last moves from the keys onto dS: k e^(c_last - c) = (k e^-c) e^c_last.
    d_state[...] = (ds_decayed if per_channel else ds).astype(_BF16)
    decayed[...] = decay.scale_rows(load(q_smem), lambda c, c_last: c).astype(_BF16)
    if per_channel:
      scratch["k_grown"][...] = decay.scale_rows(load(k_smem), lambda c, c_last: -c).astype(_BF16)
    plgpu.commit_smem()
    extra = plgpu.load(scratch["extra"], layout=_COLS)

    # The products that need only SMEM operands, issued together: the carried dS and the scores
    # and their gradient, each also transposed, so that every product below has its (size, size)
    # operand in registers, as wgmma's left operand.
    if per_channel:
      scores_t = [(scratch["k_grown"], transpose(decayed))]
    else:
      scores_t = [(k_smem, transpose(q_smem))]
    ds, scores_t, d_scores, d_scores_t = _matmuls(
        (ds_decayed, [(transpose(decayed), do_smem)]), (square, scores_t),
        (square, [(do_smem, transpose(v_smem))]), (square, [(v_smem, transpose(do_smem))]))
    if per_channel:
      scores_t = jnp.where(_causal(square, transposed=True), scores_t, 0.0)
      d_scores = jnp.where(_causal(square), d_scores, 0.0)
      d_scores_t = jnp.where(_causal(square, transposed=True), d_scores_t, 0.0)
    else:
      scores_t = scores_t * decay.decay_matrix(True)
      d_scores = d_scores * decay.decay_matrix()
      d_scores_t = d_scores_t * decay.decay_matrix(True)
    scores_t, d_scores, d_scores_t = (x.astype(_BF16) for x in (scores_t, d_scores, d_scores_t))

    # dv and dk_inter, then dk (started from dk_inter) and dq, one wait each: registers allow no
    # more at once. With one decay per step the decays ride on the operands, q e^c's SMEM now
    # holding k e^(c_last - c); per key channel they scale the products.
    if per_channel:
      keys_to_end, values_to_end = scratch["k_grown"], v_smem
      key_scale = decay.scale_rows
    else:
      from_end = lambda x: decay.scale_rows(load(x), lambda c, c_last: c_last - c).astype(_BF16)
      decayed[...] = from_end(k_smem)
      plgpu.commit_smem()
      keys_to_end, values_to_end = decayed, from_end(v_smem)
      key_scale = lambda x, exponent: x
    dv_, dk_inter = _matmuls(((CHUNK, dv), [(scores_t, do_smem), (keys_to_end, d_state)]),
                             ((CHUNK, dk), [(values_to_end, transpose(d_state))]))
    dv_ = dv_.astype(_BF16)
    extra = extra + jnp.sum(load(k_smem) * key_scale(dk_inter, lambda c, c_last: -c), axis=0)
    (dk_,) = _matmuls((dk_inter, [(d_scores_t, decayed if per_channel else q_smem)]))
    dk_ = key_scale(dk_, lambda c, c_last: -c)
    # dc = q dq - k dk + the c_last term, summed over channels as it goes with one decay per step,
    # so that little stays live across the last product.
    rows = plgpu.broadcasted_iota(jnp.int32, (CHUNK, dk), 0, layout=wgmma)
    channel_sum = (lambda x: x) if per_channel else (lambda x: jnp.sum(x, axis=1))
    dc = channel_sum(jnp.where(rows == CHUNK - 1, _cols(extra, (CHUNK, dk)), 0.0)
                     - load(k_smem) * dk_)
    dk_ = dk_.astype(_BF16)
    if per_channel:
      dq_terms = [(d_scores, scratch["k_grown"]), (do_smem, transpose(state))]
    else:
      do_decayed = decay.scale_rows(load(do_smem), lambda c, c_last: c).astype(_BF16)
      dq_terms = [(d_scores, k_smem), (do_decayed, transpose(state))]
    (dq,) = _matmuls(((CHUNK, dk), dq_terms))
    dq = key_scale(dq, lambda c, c_last: c)
    dc = dc + channel_sum(load(q_smem) * dq)

    # The gradients leave through the SMEM of the inputs they match, whose reads are all done.
    dc_smem = scratch["c" if per_channel else "c_rows"]
    for smem, value in ((q_smem, dq.astype(_BF16)), (k_smem, dk_), (v_smem, dv_)):
      smem[...] = value
    dc_smem[...] = dc
    plgpu.commit_smem()
    for smem, ref in ((q_smem, dq_ref), (k_smem, dk_ref), (v_smem, dv_ref)):
      plgpu.copy_smem_to_gmem(smem, ref.at[b, steps, h])
    plgpu.copy_smem_to_gmem(dc_smem, dc_ref.at[b, steps, h] if per_channel else dc_ref.at[b, h, steps])
    return ds

  return lax.fori_loop(0, n_chunks, step, ds)
