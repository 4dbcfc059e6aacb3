"""The selective scan's forward as a Mosaic GPU kernel (Hopper), Pallas's warpgroup-level GPU backend.

One CUDA block per (batch element, 128 channels): one warpgroup, one channel per thread, the n
states of a channel in that thread's registers. B_t and C_t are the same for every channel of a
group, so each thread reads them as scalars from shared memory (a broadcast, no bank conflicts).
Time goes by in chunks of CHUNK steps: the tensor-memory accelerator (TMA) brings chunk k + 1's
x, dt, z, B and C into shared memory while chunk k computes, and y leaves the same way.

The backward stays with the portable kernels (kernels/selective_scan_pallas.py), which this forward
feeds with the same chunk-boundary states: their gradients of B and C sum over channels, a
reduction across threads that Mosaic GPU's warpgroup arrays only offer as a whole-array reduction
with a barrier each, 2n of them per step.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHANNELS = 128  # one warpgroup, one channel per thread
# Pallas's automatic barriers put a warpgroup barrier before and after every shared-memory store,
# two per step for y alone, which lines the four warps up every step. False turns them off; the
# kernel then orders its shared memory itself: commit_smem (a proxy fence and a warpgroup
# barrier) before each TMA store and after each wait for TMA stores to finish reading.
AUTO_BARRIERS = True


def supported(d, groups, n, chunk):
  """Whether the kernel handles these sizes: whole 128-channel blocks within a group, and TMA
  copies of B and C rows at least 16 bytes wide."""
  return (d // groups) % CHANNELS == 0 and n % 8 == 0 and chunk % 8 == 0


def _tree_sum(terms):
  """Sums pairwise: a dependent chain log2(len) deep instead of len deep."""
  while len(terms) > 1:
    terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
  return terms[0]


def forward(x, dt, A, B, C, D, dt_bias, z, h0, *, length, softplus, chunk, save_chunks,
            interpret=None):
  """Returns y, the final state (batch, d, n) float32 and, if save_chunks, the state before each
  chunk as (batch, chunks, d, n) float32. Inputs are padded to a multiple of chunk steps; steps
  from `length` on leave the state alone."""
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  num_chunks = padded_length // chunk
  has_z = z is not None
  # One f32 array of per-channel parameters, rows A^T (n), D, dt_bias: one copy brings them all.
  params = jnp.concatenate([A.T, D[None], dt_bias[None]]).astype(jnp.float32)
  h0 = jnp.swapaxes(h0, 1, 2).astype(jnp.float32)
  B = B.reshape(batch, padded_length, groups * n)
  C = C.reshape(batch, padded_length, groups * n)
  seq_inputs = [x, dt] + [z] * has_z

  def kernel(*refs):
    num_in = 6 + has_z
    x_g, dt_g = refs[0], refs[1]
    z_g = refs[2] if has_z else None
    B_g, C_g, params_g, h0_g = refs[2 + has_z:num_in]
    outs = refs[num_in:num_in + 2 + save_chunks]
    y_g, h_last_g = outs[:2]
    chunks_g = outs[2] if save_chunks else None
    scratch = refs[num_in + 2 + save_chunks:]
    seq_s, bc_s, params_s, h0_s, state_s, y_s, bars, setup_bar = (
        scratch[:len(seq_inputs)], scratch[len(seq_inputs):-6], *scratch[-6:])
    b = jax.lax.axis_index("b")
    c = jax.lax.axis_index("c")
    cols = pl.ds(c * CHANNELS, CHANNELS)
    group_cols = pl.ds((c * CHANNELS) // (d // groups) * n, n)

    plgpu.copy_gmem_to_smem(params_g.at[:, cols], params_s, setup_bar)
    plgpu.copy_gmem_to_smem(h0_g.at[b, :, cols], h0_s, setup_bar)
    plgpu.barrier_wait(setup_bar)
    A_rows = [params_s[i] for i in range(n)]
    D_row, bias_row = params_s[n], params_s[n + 1]
    h = tuple(h0_s[i] for i in range(n))

    def fetch(k, slot):
      rows = pl.ds(k * chunk, chunk)
      for src, dst in zip([x_g, dt_g] + [z_g] * has_z, seq_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, cols], dst.at[slot], bars.at[slot])
      for src, dst in zip((B_g, C_g), bc_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, group_cols], dst.at[slot], bars.at[slot])

    fetch(0, 0)
    stores_per_chunk = 1 + save_chunks

    def chunk_body(k, h):
      slot = k % 2

      @pl.when(k + 1 < num_chunks)
      def _():
        fetch(k + 1, 1 - slot)

      plgpu.barrier_wait(bars.at[slot])
      # The copies out of this slot's buffers two chunks ago must have read them, before any
      # thread writes there: one thread issued and waits for them, the barrier tells the rest.
      plgpu.wait_smem_to_gmem(stores_per_chunk, wait_read_only=True)
      plgpu.commit_smem()
      if save_chunks:
        for i in range(n):
          state_s[slot, i] = h[i]
      x_s, dt_s = seq_s[0], seq_s[1]
      B_s, C_s = bc_s
      h = list(h)
      for t in range(chunk):
        xv = x_s[slot, t].astype(jnp.float32)
        dtv = dt_s[slot, t].astype(jnp.float32) + bias_row
        if softplus:
          dtv = jnp.maximum(dtv, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(dtv)))
        if length % chunk:
          dtv = dtv * (k * chunk + t < length).astype(jnp.float32)
        drive = dtv * xv
        for i in range(n):
          h[i] = jnp.exp(dtv * A_rows[i]) * h[i] + drive * B_s[slot, t, i].astype(jnp.float32)
        y = _tree_sum([D_row * xv] + [h[i] * C_s[slot, t, i].astype(jnp.float32) for i in range(n)])
        if has_z:
          zv = seq_s[2][slot, t].astype(jnp.float32)
          y = y * zv / (1.0 + jnp.exp(-zv))
        y_s[slot, t] = y.astype(y_s.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_s.at[slot], y_g.at[b, pl.ds(k * chunk, chunk), cols])
      if save_chunks:
        plgpu.copy_smem_to_gmem(state_s.at[slot], chunks_g.at[b, k, :, cols])
      return tuple(h)

    h = jax.lax.fori_loop(0, num_chunks, chunk_body, h)
    plgpu.wait_smem_to_gmem(0)
    plgpu.commit_smem()
    for i in range(n):
      state_s[0, i] = h[i]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_s.at[0], h_last_g.at[b, :, cols])
    plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((batch, n, d), jnp.float32)]
  if save_chunks:
    out_type.append(jax.ShapeDtypeStruct((batch, num_chunks, n, d), jnp.float32))
  scratch = ([plgpu.SMEM((2, chunk, CHANNELS), a.dtype) for a in seq_inputs]
             + [plgpu.SMEM((2, chunk, n), a.dtype) for a in (B, C)]
             + [plgpu.SMEM((n + 2, CHANNELS), jnp.float32), plgpu.SMEM((n, CHANNELS), jnp.float32),
                plgpu.SMEM((2, n, CHANNELS), jnp.float32),
                plgpu.SMEM((2, chunk, CHANNELS), x.dtype),
                plgpu.Barrier(num_arrivals=len(seq_inputs) + 2, num_barriers=2),
                plgpu.Barrier(num_arrivals=2)])
  call = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=(batch, d // CHANNELS),
      grid_names=("b", "c"), interpret=interpret,
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not AUTO_BARRIERS,
                                           lowering_semantics=plgpu.LoweringSemantics.Lane))
  outs = call(*seq_inputs, B, C, params, h0)
  y, h_last = outs[:2]
  h_last = jnp.swapaxes(h_last, 1, 2)
  if save_chunks:
    return y, h_last, jnp.swapaxes(outs[2], 2, 3)
  return y, h_last
