"""The selective scan's forward and backward as Mosaic GPU kernels (Hopper), Pallas's warpgroup-level
GPU backend.

Time goes by in chunks of `chunk` steps: the tensor-memory accelerator (TMA) brings the next
chunk's inputs into shared memory while this one computes, and the outputs leave the same way.

The forward runs one warpgroup per (batch element, FORWARD_CHANNELS channels), so that at Mamba's
sizes the blocks load all of an H100's SMs evenly; a channel's n states are spread over the
128 / FORWARD_CHANNELS lanes that hold it, in different warps, whose partial sums of y meet in
shared memory. B and C arrive in their own dtype and are converted to float32 once a chunk, each
thread's states made adjacent, so that each thread reads its states' B_t and C_t, which differ
between warps, as one vector load with inline Mosaic GPU code (Lane semantics addresses shared
memory the same way in every lane). dt's softplus and dt * x are computed once per (step,
channel) and shared. It takes FORWARD_CHUNKS chunks a loop iteration and saves the state before
each chunk.

The backward runs one warpgroup per (batch element, BACKWARD_CHANNELS channels), laid out as the
forward's so that its blocks too load all SMs evenly: the adjoint recurrences of different states
do not interact, and the per-step sums over a channel's states (for dx, ddt and dz) meet in shared
memory. It walks the chunks in reverse, recomputes the states at the start of every span of
BACKWARD_SPAN steps from the saved one into shared memory, then, span by span in reverse, a span's
states in registers, and runs the adjoint recurrence. Its gradients of B_t and C_t sum over channels, across threads: each
thread writes its states' terms per step into a column of a shared-memory tile, 128 rows for
`steps` = 128 / 2n steps, and after those steps thread r sums row r (conflict-free with rows padded
by a word): one barrier pair per tile instead of a shuffle tree and a barrier per sum. The tiles of
a chunk run as a loop, not unrolled, so the code fits the instruction cache. On the GPU the blocks
add their row sums into one float32 array per group with reducing TMA copies (one partial array a
block would be 100 MB at Mamba's sizes); the blocks' order of addition is not fixed, so the
gradients of B and C may differ in their last bits between runs of the same inputs.
"""

import functools
import math

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, memref, nvvm, vector

CHANNELS = 128  # threads a warpgroup; the kernels take whole groups of this many channels
# Channels per forward block, of one warpgroup (0: chosen by `_block_channels`): each thread holds
# n * channels / 128 of a channel's states, the 128 / channels lanes of a channel in different
# warps. Mamba's batch 8 x d 1536 are 12,288 (batch, channel) rows: blocks must be quarters of 128
# rows to load 132 SMs evenly (3 an SM at most). Forward kernel times on an H100 (kernels/NOTES.md,
# v5): 32: 0.233 ms (0.218 with the later cuts), 64: 0.279, 16: 0.374; the 128-channel forward of
# two warpgroups before it 0.278.
FORWARD_CHANNELS = 0
# Input buffers of the forward: the copies of chunk k + FORWARD_SLOTS - 1 start while chunk k
# computes. Forward kernel times on an H100: 2: 0.218 ms, 3: 0.230 ms.
FORWARD_SLOTS = 2
# Chunks the forward takes at once (where they divide the chunks): its input copies, y stores,
# barriers and the code that issues them come once a window. Forward kernel times on an H100
# (kernels/NOTES.md, v6): 1: 0.221 ms, 2: 0.208 ms, 4: 0.363 ms (115 KB of shared memory a
# block: one block an SM).
FORWARD_CHUNKS = 2
# Channels per backward block, of one warpgroup, laid out as the forward's (0: chosen by
# `_block_channels`): each thread holds n * channels / 128 of a channel's states. 32 gives 384
# blocks at Mamba's batch 8 x d 1536, 3 an SM at most. Backward kernel times on an H100
# (kernels/NOTES.md, v6): 32: 0.735 ms, 64: 0.906; the blocks of 128 channels and two warpgroups of
# 8 states before it (96 on 132 SMs): 1.04 ms.
BACKWARD_CHANNELS = 0
# Blocks of 32 and of 64 channels an SM holds at once, in either kernel: 3 of 32, as shared memory
# and registers allow (kernels/NOTES.md, v6); 2 of 64, as session 9's timings at three shapes fit.
BLOCKS_PER_SM = {32: 3, 64: 2}
# Steps the backward recomputes and holds in registers at once (a divisor of the 128 / 2n steps
# whose dB, dC terms fill the reduction tile): the states before and after each step and its
# decays, ((span + 1) m + span m registers for a thread's m states). Backward kernel times on an
# H100 (kernels/NOTES.md, v6): 2: 0.776 ms, 4: 0.737 ms.
BACKWARD_SPAN = 4


def _block_channels(rows):
  """Channels per block for `rows` (batch element, channel) rows: the size whose blocks fill the
  fewest waves of the device's SMs, the smaller on a tie. At batch 8 x d 2048 (Mamba-370m) blocks
  of 64 fill an H100 once where blocks of 32 need a second wave, a quarter full: the backward
  0.93 against 1.13 ms, the forward 0.275 against 0.297 (kernels/NOTES.md, session 9). Where both
  take one wave (d 1536) or two (768 blocks of 32), 32 is faster."""
  sms = _multiprocessor_count()
  return min(BLOCKS_PER_SM, key=lambda c: (-(-rows // (c * sms * BLOCKS_PER_SM[c])), c))


@functools.cache
def _multiprocessor_count():
  """The GPU's SM count; an H100 SXM's 132 where there is none (the interpreter on CPU)."""
  device = jax.devices()[0]
  return (device.platform == "gpu" and getattr(device, "core_count", 0)) or 132


def supported(d, groups, n, chunk):
  """Whether the kernels handle these sizes: whole 128-channel blocks within a group; n of 8 or 16
  (TMA copies of B and C rows at least 16 bytes wide, and 2n rows of B_t and C_t terms per step
  tiling the backward's 128-row reduction tile); and chunks of whole reduction spans."""
  return ((d // groups) % CHANNELS == 0 and n in (8, 16) and chunk % 8 == 0
          and chunk % _reduction_steps(n) == 0)


def _reduction_steps(n):
  """Steps whose dB_t and dC_t terms (2n rows each) fill the backward's 128-row reduction tile."""
  return CHANNELS // (2 * n)


_LOG2_E = 1.4426950408889634


def _tree_sum(terms):
  """Sums pairwise: a dependent chain log2(len) deep instead of len deep."""
  while len(terms) > 1:
    terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
  return terms[0]


def _softplus(v):
  return jnp.maximum(v, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(v)))


def _parameter_rows(A, D, dt_bias, subsets):
  """Both kernels' parameters as one float32 array (one copy): rows log2(e) A^T (n), then D and
  dt_bias each repeated `subsets` times, so that a (subsets, channels) view gives every lane its
  channel's value."""
  return jnp.concatenate([A.T * _LOG2_E, jnp.tile(D[None], (subsets, 1)),
                          jnp.tile(dt_bias[None], (subsets, 1))]).astype(jnp.float32)


def _states_in_float32_by_thread(B, C, subsets):
  """The backward's B and C: float32, each group's states reordered so that a thread's n / subsets
  states (i * subsets + p) sit together for one vector load. In bf16 each read of B_t or C_t would
  also cost a shift out of its packed pair, while the conversion here is 2 x 1 MB at Mamba's sizes
  (kernels/NOTES.md, v4). The forward converts and reorders in the kernel instead (v6 forward)."""
  batch, padded_length, groups, n = B.shape
  order = [i * subsets + p for p in range(subsets) for i in range(n // subsets)]
  flat = lambda a: a[..., order].reshape(batch, padded_length, groups * n).astype(jnp.float32)
  return flat(B), flat(C)


def _column_offsets(arrays, d):
  """Where each sequence input's d channels start: the gate z may be a wider array whose last d
  channels it is (Mamba's in_proj output xz), which the kernels then read in place rather than
  have XLA copy its half out (kernels/NOTES.md, session 8)."""
  return [a.shape[-1] - d for a in arrays]


def _compiler_params():
  """Without Pallas's automatic barriers (one before and one after every shared-memory store):
  the kernels order their shared memory themselves, commit_smem (a proxy fence and a warpgroup
  barrier) before each TMA store and after each wait for TMA stores to finish reading, mbarriers
  between warpgroups. With them the forward spent 22% of its stall samples at barriers and took
  0.47 against 0.33 ms (kernels/NOTES.md)."""
  return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                              lowering_semantics=plgpu.LoweringSemantics.Lane)


def _lane_load(row, lanes, start, count, interpret):
  """Lane l of a `lanes`-shaped array (l = p * lanes[1] + c) gets row[first(l) + i] for i < count,
  as `count` arrays, where first(l) = (l // divisor % modulus) * multiplier for
  start = (divisor, modulus, multiplier).

  Lane semantics addresses shared memory alike in every lane (up to a strided view), so on the
  GPU this is inline Mosaic GPU code: one vector load of `count` floats per thread. The
  interpreter, which cannot run inline code, gathers instead."""
  divisor, modulus, multiplier = start
  if interpret is not None:
    lane = (jax.lax.broadcasted_iota(jnp.int32, lanes, 0) * lanes[1]
            + jax.lax.broadcasted_iota(jnp.int32, lanes, 1))
    first = lane // divisor % modulus * multiplier
    values = row[...]
    return [values[first + i] for i in range(count)]
  layout = plgpu.Layout.WG_STRIDED(lanes, vec_size=1)

  array = plgpu.ShapeDtypeStruct(lanes, jnp.float32, layout=layout)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=[array] * count)
  def load(_, ref):
    index = ir.IndexType.get()
    constant = lambda v: arith.constant(index, v)
    lane = arith.remui(gpu.thread_id(gpu.Dimension.x), constant(CHANNELS))
    first = arith.muli(arith.remui(arith.divui(lane, constant(divisor)), constant(modulus)),
                       constant(multiplier))
    f32 = ir.F32Type.get()
    # Aligned to its size (callers keep first and the row's offset multiples of count): one
    # vector load, not count.
    values = vector.load(ir.VectorType.get((count,), f32), ref, [first], alignment=4 * count)
    one = ir.VectorType.get((1,), f32)
    return [mgpu.FragmentedArray(
        _registers=np.array([vector.broadcast(one, vector.extract(
            values, dynamic_position=[], static_position=[i]))], dtype=object),
        _layout=mgpu.WGStridedFragLayout(lanes, 1), _is_signed=None) for i in range(count)]

  return load(row)


def _sigmoid(v):
  """1 / (1 + e^-v) with the reciprocal as the square of rsqrt.approx (2^-22.9 relative error,
  kernels/NOTES.md v5): Lane semantics lowers 1 / v to div.rn.f32, about ten instructions with its
  Newton steps and slow path, against rsqrt's one and a multiply. 1 + e^-v >= 1; where e^-v
  overflows, rsqrt(inf) = 0."""
  r = jax.lax.rsqrt(1.0 + jnp.exp(-v))
  return r * r


def _gate(z):
  """silu(z) = z sigmoid(z)."""
  return z * _sigmoid(z)


def _dot(u, v):
  """sum_i u_i v_i as a chain of FMAs: the steps of a recurrence overlap, not the terms."""
  total = u[0] * v[0]
  for a, b in zip(u[1:], v[1:]):
    total = a * b + total
  return total


def _states_by_thread(sources, targets, subsets, interpret):
  """target[t, p * m + i] = float32 source[t, i * subsets + p] for (chunk, n) buffers of B and C:
  the m = n / subsets states that the threads of subset p hold, converted and made adjacent once
  a chunk, so the recurrence reads a thread's B_t (or C_t) as one float32 vector load a step.

  On the GPU this is inline Mosaic GPU code (Lane semantics cannot give lanes different
  addresses): the chunk's (step, subset) groups of B, then of C, go one a thread; each thread
  loads its group's m scalars and stores them as one vector. The interpreter permutes instead."""
  chunk, n = targets[0].shape
  m = n // subsets
  if interpret is not None:
    for source, target in zip(sources, targets):
      by_state = source[...].astype(jnp.float32).reshape(chunk, m, subsets)
      target[...] = jnp.swapaxes(by_state, 1, 2).reshape(chunk, n)
    return
  group_count = chunk * subsets  # per buffer

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 4)
  def convert(_, *refs):
    index = ir.IndexType.get()
    constant = lambda v: arith.constant(index, v)
    f32 = ir.F32Type.get()
    lane = arith.remui(gpu.thread_id(gpu.Dimension.x), constant(CHANNELS))
    for round_start in range(0, 2 * group_count, CHANNELS):
      item = arith.addi(lane, constant(round_start))
      for which, (source, target) in enumerate(zip(refs[:2], refs[2:])):
        first, end = which * group_count, (which + 1) * group_count
        if round_start >= end or round_start + CHANNELS <= first:
          continue
        in_range = arith.andi(arith.cmpi(arith.CmpIPredicate.uge, item, constant(first)),
                              arith.cmpi(arith.CmpIPredicate.ult, item, constant(end)))
        with mgpu.utils.when(in_range):
          group = arith.subi(item, constant(first))
          step = arith.divui(group, constant(subsets))
          subset = arith.remui(group, constant(subsets))
          values = []
          for i in range(m):
            value = memref.load(source, [step, arith.addi(subset, constant(i * subsets))])
            values.append(value if value.type == f32 else arith.extf(f32, value))
          vector.store(vector.from_elements(ir.VectorType.get((m,), f32), values), target,
                       [step, arith.muli(subset, constant(m))], alignment=4 * m)

  convert(*sources, *targets)


def _await_stores_read(allow, interpret):
  """Waits until at most the `allow` latest TMA stores of this thread still read shared memory,
  without the warpgroup barrier that Pallas's wait_smem_to_gmem adds: the caller's next
  commit_smem tells every thread (one barrier a chunk fewer in the forward)."""
  if interpret is not None:
    plgpu.wait_smem_to_gmem(allow, wait_read_only=True)
    return

  @plgpu.inline_mgpu()
  def wait(_):
    nvvm.cp_async_bulk_wait_group(allow, read=True)

  wait()


def forward(x, dt, A, B, C, D, dt_bias, z, h0, *, length, softplus, chunk, save_chunks,
            interpret=None):
  """Returns y, the final state (batch, d, n) float32 and, if save_chunks, the state before each
  chunk as (batch, chunks, n, d) float32 (the layout `backward` reads). Inputs are padded to a
  multiple of chunk steps; steps from `length` on leave the state alone. The gate z (or None) is
  the last d channels of its array, which may be wider (read in place).

  Blocks of FORWARD_CHANNELS channels and one warpgroup: lane p * channels + c holds channel c's
  states i * subsets + p (i < n / subsets), subsets = 128 / channels. Time goes by in windows of
  FORWARD_CHUNKS chunks (or fewer where they do not divide the chunks), three passes a window:
  (1) dt after bias, softplus and the padding mask, dt * x, D x and the gate, once per (step,
  channel), `subsets` steps of one channel a thread, and B_t, C_t in float32 with a thread's
  states adjacent (`_states_by_thread`); (2) the recurrence, each thread its states, its per-step
  sums of h_i C_i kept in registers and stored at the window's end; (3) y per (step, channel):
  the subsets' sums, D x and the gate. Pass (1) alone reads the input buffers, and passes (3) of
  window k and (1) of window k + 1 share the warpgroup barriers around them: two barriers a
  window. The copies of window k + FORWARD_SLOTS start once pass (1) of window k is done."""
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  channels = FORWARD_CHANNELS or _block_channels(batch * d)
  subsets = CHANNELS // channels
  m = n // subsets  # states per thread
  lanes = (subsets, channels)  # the shape of every per-thread array
  slots = FORWARD_SLOTS
  num_chunks = padded_length // chunk
  per_window = math.gcd(num_chunks, FORWARD_CHUNKS)  # chunks
  window = per_window * chunk  # steps
  num_windows = num_chunks // per_window
  has_z = z is not None
  f32 = jnp.float32
  params = _parameter_rows(A, D, dt_bias, subsets)
  # B and C arrive in their own dtype, groups and states on one axis: the kernel converts them.
  B, C = (a.reshape(batch, padded_length, groups * n) for a in (B, C))
  h0 = jnp.swapaxes(h0, 1, 2).astype(f32)
  seq_inputs = [x, dt] + [z] * has_z
  offsets = _column_offsets(seq_inputs, d)

  def selective_scan_forward(*refs):  # the name profilers show
    num_in = 6 + has_z
    B_g, C_g, params_g, h0_g = refs[2 + has_z:num_in]
    y_g, h_last_g = refs[num_in:num_in + 2]
    chunks_g = refs[num_in + 2] if save_chunks else None
    scratch = refs[num_in + 2 + save_chunks:]
    seq_s, bc_s = scratch[:len(seq_inputs)], scratch[len(seq_inputs):len(seq_inputs) + 2]
    (params_s, state_s, bc_f32_s, dt_s, drive_s, part_s, y_s, bars,
     setup_bar) = scratch[len(seq_inputs) + 2:]
    b = jax.lax.axis_index("b")
    c = jax.lax.axis_index("c")
    cols = pl.ds(c * channels, channels)
    group_cols = pl.ds((c * channels) // (d // groups) * n, n)
    plgpu.copy_gmem_to_smem(params_g.at[:, cols], params_s, setup_bar)
    plgpu.copy_gmem_to_smem(h0_g.at[b, :, cols], state_s.at[0, 0], setup_bar)
    plgpu.barrier_wait(setup_bar)
    my_states = lambda i: pl.ds(i * subsets, subsets)  # rows of state i * subsets + p
    A_rows = [params_s[my_states(i)] for i in range(m)]
    D_rows, bias_rows = params_s[pl.ds(n, subsets)], params_s[pl.ds(n + subsets, subsets)]
    # Passes (1) and (3) take `subsets` steps at a time: lane p * channels + c has step p and
    # channel c.
    step_in_group = plgpu.broadcasted_iota(jnp.int32, lanes, 0,
                                           layout=plgpu.Layout.WG_STRIDED(lanes, vec_size=1))
    group_steps = lambda j: pl.ds(j * subsets, subsets)

    def fetch(k):
      rows, slot = pl.ds(k * window, window), k % slots
      for src, dst, offset in zip(refs[:len(seq_inputs)], seq_s, offsets):
        plgpu.copy_gmem_to_smem(src.at[b, rows, pl.ds(offset + c * channels, channels)],
                                dst.at[slot], bars.at[slot])
      for src, dst in zip((B_g, C_g), bc_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, group_cols], dst.at[slot], bars.at[slot])

    def prepare(k, inputs_ready):
      """Pass (1) of window k, whose inputs are in their buffers once inputs_ready (a predicate)
      holds: the inputs the recurrence reads go to shared memory; D x and the gate, which pass
      (3) applies, stay in registers."""
      slot = k % slots
      pl.when(inputs_ready)(lambda: plgpu.barrier_wait(bars.at[slot]))
      skips, gates = [], []
      for j in range(window // subsets):
        steps = group_steps(j)
        dt_v = seq_s[1][slot, steps].astype(f32) + bias_rows
        if softplus:
          dt_v = _softplus(dt_v)
        if length < padded_length:
          dt_v = dt_v * (k * window + j * subsets + step_in_group < length).astype(f32)
        x_v = seq_s[0][slot, steps].astype(f32)
        skips.append(D_rows * x_v)
        if has_z:
          gates.append(_gate(seq_s[2][slot, steps].astype(f32)))
        dt_s[steps] = dt_v
        drive_s[steps] = dt_v * x_v
      _states_by_thread([buffer.at[slot] for buffer in bc_s], bc_f32_s, subsets, interpret)
      return tuple(skips), tuple(gates)

    for k in range(min(slots, num_windows)):
      fetch(k)
    first = prepare(0, True)
    plgpu.commit_smem()

    def window_body(k, carry):
      h, (skips, gates) = carry
      out_slot = k % 2  # of the saved states and y

      @pl.when(k + slots < num_windows)
      def _():
        # Into this window's input buffers, which pass (1) has read.
        fetch(k + slots)

      # Each step's sum over this thread's states of h_i C_i stays in registers until the
      # window's last step: a shared-memory store between steps would keep the compiler from
      # loading the next steps' inputs early (ptxas cannot tell the buffers apart): with a
      # store a step this kernel took 0.246 ms on an H100 (kernels/NOTES.md, v5). So do the
      # states before the window's chunks, which are saved after it.
      starts, parts = [h], []
      h = list(h)
      for t in range(window):
        if t and t % chunk == 0:
          starts.append(h)
        # This lane's channel's dt and dt x; its states' B_t and C_t, one vector load each.
        dt_t, drive_t = (_lane_load(buffer.at[t], lanes, (1, channels, 1), 1, interpret)[0]
                         for buffer in (dt_s, drive_s))
        B_t, C_t = (_lane_load(buffer.at[t], lanes, (channels, subsets, m), m, interpret)
                    for buffer in bc_f32_s)
        h = [jnp.exp2(dt_t * a) * hi + drive_t * bi for a, hi, bi in zip(A_rows, h, B_t)]
        part = h[0] * C_t[0]
        for hi, ci in zip(h[1:], C_t[1:]):  # a chain of FMAs: steps overlap, not terms
          part = hi * ci + part
        parts.append(part)
      for t, part in enumerate(parts):
        part_s[t] = part
      # The copies out of this window's slots of state_s and y_s, issued two windows ago, must
      # have read them before the stores after the next barrier: after them came only the last
      # window's copies.
      _await_stores_read(1 + save_chunks, interpret)
      plgpu.commit_smem()
      for j, skip in enumerate(skips):
        steps = group_steps(j)
        y = _tree_sum([part_s[steps, p] for p in range(subsets)] + [skip])
        if has_z:
          y = y * gates[j]
        y_s[out_slot, steps] = y.astype(y_s.dtype)
      if save_chunks:
        for s, start in enumerate(starts):
          for i in range(m):
            state_s[out_slot, s, my_states(i)] = start[i]
      # After the last window this reads stale buffers, without waiting: its results go unused.
      ahead = prepare(k + 1, k + 1 < num_windows)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_s.at[out_slot], y_g.at[b, pl.ds(k * window, window), cols])
      if save_chunks:
        plgpu.copy_smem_to_gmem(state_s.at[out_slot],
                                chunks_g.at[b, pl.ds(k * per_window, per_window), :, cols])
      return tuple(h), ahead

    h0_rows = tuple(state_s[0, 0, my_states(i)] for i in range(m))
    h, _ = jax.lax.fori_loop(0, num_windows, window_body, (h0_rows, first))
    plgpu.wait_smem_to_gmem(0)
    plgpu.commit_smem()
    for i in range(m):
      state_s[0, 0, my_states(i)] = h[i]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(state_s.at[0, 0], h_last_g.at[b, :, cols])
    plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((batch, n, d), f32)]
  if save_chunks:
    out_type.append(jax.ShapeDtypeStruct((batch, num_chunks, n, d), f32))
  scratch = ([plgpu.SMEM((slots, window, channels), a.dtype) for a in seq_inputs]
             + [plgpu.SMEM((slots, window, n), a.dtype) for a in (B, C)]
             + [plgpu.SMEM((n + 2 * subsets, channels), f32),
                plgpu.SMEM((2, per_window, n, channels), f32)]
             # B_t and C_t in float32, dt, dt * x and the partial sums of y: written and read
             # within a window.
             + [[plgpu.SMEM((window, n), f32) for _ in (B, C)]]
             + [plgpu.SMEM((window, channels), f32) for _ in range(2)]
             + [plgpu.SMEM((window, subsets, channels), f32),
                plgpu.SMEM((2, window, channels), x.dtype),
                plgpu.Barrier(num_arrivals=len(seq_inputs) + 2, num_barriers=slots),
                plgpu.Barrier(num_arrivals=2)])
  call = plgpu.kernel(
      selective_scan_forward, out_type=out_type, scratch_types=scratch,
      grid=(batch, d // channels), grid_names=("b", "c"), interpret=interpret,
      compiler_params=_compiler_params())
  outs = call(*seq_inputs, B, C, params, h0)
  y, h_last = outs[:2]
  h_last = jnp.swapaxes(h_last, 1, 2)
  return (y, h_last, outs[2]) if save_chunks else (y, h_last)


def backward(x, dt, A, B, C, D, dt_bias, z, chunks, dy, dh_last, *, length, softplus, chunk,
             interpret=None):
  """The gradients of `forward`, given its saved chunk states (batch, chunks, n, d), with z as
  `forward` takes it.

  Returns dx, ddt, dz (None without z; (batch, padded length, d) however wide z is) in the inputs'
  dtypes; dB and dC as partial sums over channels, (batch, partials, padded length, n) float32
  (one partial a group on the GPU, one a block under the interpreter); and float32 per-batch dA
  (batch, d, n), dD and ddt_bias (batch, d), dh0 (batch, d, n).

  Blocks of BACKWARD_CHANNELS channels and one warpgroup, laid out as the forward's: lane
  p * channels + c holds channel c's states i * subsets + p. Per chunk, last step first:
  (1) dt after bias, softplus and the padding mask, dt * x and the gated dy, once per (step,
  channel); the state at the start of every span of BACKWARD_SPAN steps, recomputed from the
  saved one; then per reduction tile of 128 / 2n steps: (2) its spans' states recomputed in
  registers and the adjoint recurrence, each thread its states, writing the steps' dB_t, dC_t
  terms and its partial sums over states (of dh B, dh h e A' and h C) to shared memory; (3) the
  tile's row sums (thread r sums row r: one step's dB or dC term of one state over the block's
  channels) and, per (step, channel), dx, ddt and dz from the subsets' partial sums.
  """
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  channels = BACKWARD_CHANNELS or _block_channels(batch * d)
  subsets = CHANNELS // channels
  m = n // subsets  # states per thread
  lanes = (subsets, channels)  # the shape of every per-thread array but the row sums'
  steps = _reduction_steps(n)  # steps per reduction tile
  if n % subsets or steps % subsets:
    raise ValueError(f"BACKWARD_CHANNELS={channels} splits n={n} states over {subsets} lanes: "
                     "it needs n and 128 / (2n) to be multiples of 128 / BACKWARD_CHANNELS")
  span = min(BACKWARD_SPAN, steps)  # steps recomputed in registers at once
  spans = chunk // span
  tiles = chunk // steps  # reduction tiles per chunk
  blocks = d // channels
  num_chunks = padded_length // chunk
  has_z = z is not None
  f32 = jnp.float32
  params = _parameter_rows(A, D, dt_bias, subsets)
  B, C = _states_in_float32_by_thread(B, C, subsets)
  dh_last = jnp.swapaxes(dh_last, 1, 2).astype(f32)
  # x, dt and z's buffers take dx, ddt and dz once pass (3) has read them: one slot per input.
  seq_inputs = [x, dt] + [z] * has_z + [dy]
  offsets = _column_offsets(seq_inputs, d)
  num_seq = len(seq_inputs)
  num_parts = 2 + has_z  # a thread's per-step sums over its states: of dh B, dh h e A', h C
  # On the GPU every block adds its dB, dC row sums into its group's float32 array with a
  # reducing TMA copy (cp.reduce.async.bulk .add, done in L2): per-block partials would be 100 MB
  # at Mamba's sizes, written and read again by XLA. The interpreter has no reducing copies:
  # there each block writes its own partial and XLA sums them.
  reduce_in_kernel = interpret is None
  dbc_sums = (jax.new_ref(jnp.zeros((batch, groups, padded_length // steps, CHANNELS), f32))
              if reduce_in_kernel else None)

  def selective_scan_backward(*refs):  # the name profilers show
    refs = iter(refs)
    take = lambda count: [next(refs) for _ in range(count)]
    seq_g = take(num_seq)
    B_g, C_g, params_g, chunks_g, dh_last_g = take(5)
    dbc_g = take(1)[0] if reduce_in_kernel else None
    grads_g = take(num_seq - 1)  # dx, ddt, dz
    dbc_g = dbc_g if reduce_in_kernel else take(1)[0]
    dA_g, dh0_g, sums_g = take(3)
    (*seq_s, B_s, C_s, params_s, starts_s, dt_s, drive_s, dyv_s, terms_s, parts_s, dbc_s, sums_s,
     bars, setup_bar) = refs
    b = jax.lax.axis_index("b")
    c = jax.lax.axis_index("c")
    cols = pl.ds(c * channels, channels)
    group = (c * channels) // (d // groups)
    group_cols = pl.ds(group * n, n)
    # dh_last arrives in the third span-start slot, first written after it has been read.
    plgpu.copy_gmem_to_smem(params_g.at[:, cols], params_s, setup_bar)
    plgpu.copy_gmem_to_smem(dh_last_g.at[b, :, cols], starts_s.at[2], setup_bar)
    plgpu.barrier_wait(setup_bar)
    my_states = lambda i: pl.ds(i * subsets, subsets)  # rows of state i * subsets + p
    A_rows = [params_s[my_states(i)] for i in range(m)]
    D_rows, bias_rows = params_s[pl.ds(n, subsets)], params_s[pl.ds(n + subsets, subsets)]
    # The loops' carries must enter in the layout their bodies give them (a load's, not a
    # constant's): zeros as a loaded row times zero.
    zeros = A_rows[0] * 0.0
    carry = (tuple(starts_s[2, my_states(i)] for i in range(m)), (zeros,) * m, zeros, zeros)
    # Passes (1) and (3) take `subsets` steps at a time: lane p * channels + c has step p and
    # channel c.
    step_in_group = plgpu.broadcasted_iota(jnp.int32, lanes, 0,
                                           layout=plgpu.Layout.WG_STRIDED(lanes, vec_size=1))
    # Pass (2)'s reads: this lane's channel's value of a (step, channel) buffer; its states' B_t
    # or C_t (the m from p * m on, in the reordered layout), one vector load.
    per_channel = lambda buffer, t: _lane_load(buffer.at[t], lanes, (1, channels, 1), 1,
                                               interpret)[0]
    per_state = lambda buffer, t: _lane_load(buffer.at[t], lanes, (channels, subsets, m), m,
                                             interpret)

    def fetch(k, slot):
      rows = pl.ds(k * chunk, chunk)
      for src, dst, offset in zip(seq_g, seq_s, offsets):
        plgpu.copy_gmem_to_smem(src.at[b, rows, pl.ds(offset + c * channels, channels)],
                                dst.at[slot], bars.at[slot])
      for src, dst in zip((B_g, C_g), (B_s, C_s)):
        plgpu.copy_gmem_to_smem(src.at[b, rows, group_cols], dst.at[slot], bars.at[slot])
      plgpu.copy_gmem_to_smem(chunks_g.at[b, k, :, cols], starts_s.at[slot], bars.at[slot])

    fetch(num_chunks - 1, 0)

    def chunk_body(i, carry):
      k = num_chunks - 1 - i
      slot = i % 2
      plgpu.barrier_wait(bars.at[slot])
      for j in range(chunk // subsets):  # pass (1)
        group_steps = pl.ds(j * subsets, subsets)
        dt_v = seq_s[1][slot, group_steps].astype(f32) + bias_rows
        if softplus:
          dt_v = _softplus(dt_v)
        if length % chunk:
          dt_v = dt_v * (k * chunk + j * subsets + step_in_group < length).astype(f32)
        dy_v = seq_s[-1][slot, group_steps].astype(f32)
        if has_z:
          z_v = seq_s[2][slot, group_steps].astype(f32)
          dy_v = dy_v * _gate(z_v)
        dt_s[group_steps] = dt_v
        drive_s[group_steps] = dt_v * seq_s[0][slot, group_steps].astype(f32)
        dyv_s[group_steps] = dy_v
      plgpu.commit_smem()  # pass (2) reads other lanes' values

      # The state at the start of every span s: starts_s[start(s)]. The saved one, span 0's,
      # came into starts_s[slot]; span s > 0's goes to starts_s[s + 1]. Each thread reads back
      # only the rows and column it wrote.
      start = lambda s: s + 1 - (s == 0) * (s + 1 - slot)

      def span_start(s, h):
        for t in range(span):
          step = (s - 1) * span + t
          dt_t, drive_t = per_channel(dt_s, step), per_channel(drive_s, step)
          h = [jnp.exp2(dt_t * a) * hi + drive_t * bi
               for a, hi, bi in zip(A_rows, h, per_state(B_s.at[slot], step))]
        for i in range(m):
          starts_s[s + 1, my_states(i)] = h[i]
        return h

      jax.lax.fori_loop(1, spans, span_start, [starts_s[slot, my_states(i)] for i in range(m)])
      # The previous chunk's gradient copies must have read the other slot before it refills,
      # and dbc_s before the tiles below rewrite it; waiting here, after the span pass, gives
      # them that pass's time.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      @pl.when(k > 0)
      def _():
        fetch(k - 1, 1 - slot)

      def adjoint_step(step, local_t, inputs, decay, h_prev, h, dh, dA):
        """Back-propagates through one step for this thread's states, given their decays and
        states before and after it; writes the step's dB_t, dC_t terms into the reduction tile
        and its partial sums into parts_s. Returns the new dh and dA."""
        dt_t, drive_t, B_t = inputs
        dyv_t = per_channel(dyv_s, step)
        C_t = per_state(C_s.at[slot], step)
        dh = [dhi + dyv_t * ci for dhi, ci in zip(dh, C_t)]
        row = local_t * 2 * n
        for i in range(m):
          terms_s[pl.ds(row + i * subsets, subsets), pl.ds(0, channels)] = dh[i] * drive_t
          terms_s[pl.ds(row + n + i * subsets, subsets), pl.ds(0, channels)] = dyv_t * h[i]
        through = [dhi * hp * e for dhi, hp, e in zip(dh, h_prev, decay)]
        parts = [_dot(dh, B_t), _dot(through, A_rows)] + [_dot(h, C_t)] * has_z
        for q, part in enumerate(parts):
          parts_s[q, local_t] = part
        return [dhi * e for dhi, e in zip(dh, decay)], [da + th * dt_t for da, th in zip(dA, through)]

      def outputs(tile, dD, dbias):
        """Pass (3) for the tile's steps: dx, ddt and dz per (step, channel) from the subsets'
        partial sums, over x, dt and z's slots; dD and ddt_bias added up."""
        for j in range(steps // subsets):
          local_steps = pl.ds(j * subsets, subsets)
          group_steps = pl.ds(tile * steps + j * subsets, subsets)
          d_drive, through_a, *y_part = [
              _tree_sum([parts_s[q, local_steps, p] for p in range(subsets)])
              for q in range(num_parts)]
          x_v = seq_s[0][slot, group_steps].astype(f32)
          dyv = dyv_s[group_steps]
          ddt = d_drive * x_v + through_a * (1.0 / _LOG2_E)
          if softplus:
            ddt = ddt * _sigmoid(seq_s[1][slot, group_steps].astype(f32) + bias_rows)
          if length % chunk:
            first_step = k * chunk + tile * steps + j * subsets
            ddt = ddt * (first_step + step_in_group < length).astype(f32)
          dx = d_drive * dt_s[group_steps] + dyv * D_rows
          if has_z:
            dy_raw = seq_s[-1][slot, group_steps].astype(f32)
            z_v = seq_s[2][slot, group_steps].astype(f32)
            sig = _sigmoid(z_v)
            y_pre = y_part[0] + D_rows * x_v
            seq_s[2][slot, group_steps] = (
                dy_raw * y_pre * sig * (1.0 + z_v * (1.0 - sig))).astype(seq_s[2].dtype)
          seq_s[0][slot, group_steps] = dx.astype(seq_s[0].dtype)
          seq_s[1][slot, group_steps] = ddt.astype(seq_s[1].dtype)
          dD, dbias = dD + dyv * x_v, dbias + ddt
        return dD, dbias

      def tile_body(i, carry):
        """The adjoint through the steps of one reduction tile, last step first; then the
        tile's row sums and the steps' outputs."""
        dh, dA, dD, dbias = carry
        tile = tiles - 1 - i
        for local in reversed(range(steps // span)):
          s = tile * (steps // span) + local
          h = [starts_s[start(s), my_states(j)] for j in range(m)]
          inputs = [(per_channel(dt_s, s * span + t), per_channel(drive_s, s * span + t),
                     per_state(B_s.at[slot], s * span + t)) for t in range(span)]
          states_at, decays = [h], []
          for dt_t, drive_t, B_t in inputs:
            decays.append([jnp.exp2(dt_t * a) for a in A_rows])
            states_at.append([e * hi + drive_t * bi
                              for e, hi, bi in zip(decays[-1], states_at[-1], B_t)])
          if local == steps // span - 1:
            # Every lane is past the last tile's row sums and outputs: its tile and partial
            # sums may be overwritten. Placed after the first span's recompute, which it hides.
            plgpu.commit_smem()
          for t in reversed(range(span)):
            dh, dA = adjoint_step(s * span + t, local * span + t, inputs[t], decays[t],
                                  states_at[t], states_at[t + 1], dh, dA)
        plgpu.commit_smem()  # the row sums and outputs read other lanes' terms and sums
        col = lambda j: terms_s[pl.ds(0, CHANNELS), j]
        partial = [col(j) for j in range(min(8, channels))]
        for j in range(len(partial), channels):
          partial[j % 8] = partial[j % 8] + col(j)
        dbc_s[tile] = _tree_sum(partial)
        dD, dbias = outputs(tile, dD, dbias)
        return tuple(dh), tuple(dA), dD, dbias

      carry = jax.lax.fori_loop(0, tiles, tile_body, carry)
      plgpu.commit_smem()  # the TMA stores below read what the threads wrote
      rows = pl.ds(k * chunk, chunk)
      for src, dst in zip(seq_s, grads_g):
        plgpu.copy_smem_to_gmem(src.at[slot], dst.at[b, rows, cols])
      tile_rows = pl.ds(k * tiles, tiles)
      if reduce_in_kernel:
        plgpu.copy_smem_to_gmem(dbc_s, dbc_g.at[b, group, tile_rows], reduction_op="add")
      else:
        plgpu.copy_smem_to_gmem(dbc_s, dbc_g.at[b, c, tile_rows])
      return carry

    dh, dA, dD, dbias = jax.lax.fori_loop(0, num_chunks, chunk_body, carry)
    for i in range(m):
      starts_s[0, my_states(i)] = dA[i]
      starts_s[1, my_states(i)] = dh[i]
    sums_s[0] = dD
    sums_s[1] = dbias
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(starts_s.at[0], dA_g.at[b, :, cols])
    plgpu.copy_smem_to_gmem(starts_s.at[1], dh0_g.at[b, :, cols])
    plgpu.copy_smem_to_gmem(sums_s, sums_g.at[b, :, :, cols])
    plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct(x.shape, a.dtype) for a in seq_inputs[:-1]]
  if not reduce_in_kernel:
    out_type.append(jax.ShapeDtypeStruct((batch, blocks, padded_length // steps, CHANNELS), f32))
  out_type += [jax.ShapeDtypeStruct((batch, n, d), f32), jax.ShapeDtypeStruct((batch, n, d), f32),
               jax.ShapeDtypeStruct((batch, 2, subsets, d), f32)]
  scratch = ([plgpu.SMEM((2, chunk, channels), a.dtype) for a in seq_inputs]
             + [plgpu.SMEM((2, chunk, n), f32) for _ in (B, C)]
             + [plgpu.SMEM((n + 2 * subsets, channels), f32),
                # The saved chunk states (two slots), then the span starts they lead to.
                plgpu.SMEM((spans + 1, n, channels), f32)]
             # dt, dt * x and the gated dy: written by pass (1), read within the chunk.
             + [plgpu.SMEM((chunk, channels), f32) for _ in range(3)]
             # One word of padding per row: row r's word j sits in bank (r + j) % 32.
             + [plgpu.SMEM((CHANNELS, channels + 1), f32),
                plgpu.SMEM((num_parts, steps, subsets, channels), f32),
                plgpu.SMEM((tiles, CHANNELS), f32), plgpu.SMEM((2, subsets, channels), f32),
                plgpu.Barrier(num_arrivals=num_seq + 3, num_barriers=2),
                plgpu.Barrier(num_arrivals=2)])
  call = plgpu.kernel(
      selective_scan_backward, out_type=out_type, scratch_types=scratch, grid=(batch, blocks),
      grid_names=("b", "c"), interpret=interpret, compiler_params=_compiler_params())
  outs = call(*seq_inputs, B, C, params, chunks, dh_last, *[dbc_sums] * reduce_in_kernel)
  dx, ddt = outs[0], outs[1]
  dz = outs[2] if has_z else None
  if reduce_in_kernel:
    dA, dh0, sums = outs[2 + has_z:]
    dbc = jax.freeze(dbc_sums)
  else:
    dbc, dA, dh0, sums = outs[2 + has_z:]
  # Partial j covers the j-th run of channels (a group on the GPU, a block under the
  # interpreter): the partials of a group stay contiguous.
  dbc = dbc.reshape(batch, -1, padded_length, 2, n)
  sums = sums.sum(axis=2)
  return (dx, ddt, dz, dbc[..., 0, :], dbc[..., 1, :], jnp.swapaxes(dA, 1, 2), sums[:, 0],
          sums[:, 1], jnp.swapaxes(dh0, 1, 2))
