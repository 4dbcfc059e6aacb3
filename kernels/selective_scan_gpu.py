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

The backward runs one block per (batch element, 128 channels), one channel per thread of each
warpgroup, B_t and C_t read as scalars from shared memory (a broadcast, no bank conflicts). It
splits a channel's states over BACKWARD_WARPGROUPS warpgroups: the adjoint recurrences of different
states do not interact. It walks the chunks in reverse, recomputes the states at the start of every
span of BACKWARD_SPAN steps from the saved one into shared memory, then, span by span in reverse, a
span's states in registers, and runs the adjoint recurrence. Its gradients of B_t and C_t sum over
the block's 128 channels, across threads: each thread writes its states' terms per step as a column
of a shared-memory tile, 128 rows for `steps` = 128 / 2n steps, and after those steps thread r of
each warpgroup sums its warpgroup's share of the columns of row r (conflict-free with rows padded to
129 words): one barrier pair per tile instead of a shuffle tree and a barrier per sum. At the same
barriers the warpgroups add up their per-step sums over states for dx, ddt and dz. The tiles of a
chunk run as a loop, not unrolled, so the code fits the instruction cache. The partial sums of dB
and dC leave as (batch, d / 128 * BACKWARD_WARPGROUPS, length, n) partials that XLA adds over the
blocks of a group.
"""

import math

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, memref, nvvm, vector

from kernels._common import sigmoid

CHANNELS = 128  # one warpgroup, one channel per thread
# Channels per forward block, of one warpgroup: each thread holds n * channels / 128 of a channel's
# states, the 128 / channels lanes of a channel in different warps. Mamba's batch 8 x d 1536 are
# 12,288 (batch, channel) rows: blocks must be quarters of 128 rows to load 132 SMs evenly (3 an
# SM at most). Forward kernel times on an H100 (kernels/NOTES.md, v5): 32: 0.233 ms (0.218 with
# the later cuts), 64: 0.279, 16: 0.374; the 128-channel forward of two warpgroups before it 0.278.
FORWARD_CHANNELS = 32
# Input buffers of the forward: the copies of chunk k + FORWARD_SLOTS - 1 start while chunk k
# computes. Forward kernel times on an H100: 2: 0.218 ms, 3: 0.230 ms.
FORWARD_SLOTS = 2
# Chunks the forward takes at once (where they divide the chunks): its input copies, y stores,
# barriers and the code that issues them come once a window. Forward kernel times on an H100
# (kernels/NOTES.md, v6): 1: 0.221 ms, 2: 0.208 ms, 4: 0.363 ms (115 KB of shared memory a
# block: one block an SM).
FORWARD_CHUNKS = 2
# Steps the backward recomputes and holds in registers at once (a divisor of the 128 / 2n steps
# whose dB, dC terms fill the reduction tile): the states before and after each step and its
# decays, ((span + 1) m + span m registers for a warpgroup's m states). Backward kernel times on
# an H100 (kernels/NOTES.md), two warpgroups: 2: 1.10 ms, 4: 1.04 ms; one (v3): 2: 1.21, 4: 1.26.
BACKWARD_SPAN = 4
# Warpgroups per backward block, each with n / BACKWARD_WARPGROUPS of a channel's states, so each
# SM scheduler has that many warps to switch between. Backward kernel times on an H100 with spans
# of 2: 1: 1.15 ms, 2: 1.10 ms; 4 was slower in the bench (and its float32 block exceeds shared
# memory).
BACKWARD_WARPGROUPS = 2


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


class _Step:
  """Step t of the chunk in `slot`: x, dt before and after bias/softplus (zero past the true
  length), and B_t, C_t as per-state scalars, read from shared memory where used: held across the
  backward's span of steps they would cost 2n registers a step."""

  def __init__(self, seq_s, bc_s, slot, t, first_step, bias_row, *, states, length, chunk,
               softplus):
    self.bc_s, self.slot, self.t, self.states = bc_s, slot, t, states
    self.x = seq_s[0][slot, t].astype(jnp.float32)
    self.dt_raw = seq_s[1][slot, t].astype(jnp.float32) + bias_row
    self.dt = _softplus(self.dt_raw) if softplus else self.dt_raw
    self.valid = None
    if length % chunk:
      self.valid = (first_step + t < length).astype(jnp.float32)
      self.dt = self.dt * self.valid

  def B(self):
    return [self.bc_s[0][self.slot, self.t, i].astype(jnp.float32) for i in self.states]

  def C(self):
    return [self.bc_s[1][self.slot, self.t, i].astype(jnp.float32) for i in self.states]

  def decays(self, A_rows):
    """exp(dt A), given rows of log2(e) A: exp2 is one ex2.approx; exp multiplies first."""
    return [jnp.exp2(self.dt * a) for a in A_rows]

  def advance(self, h, decays):
    drive = self.dt * self.x
    return [e * hi + drive * b for e, hi, b in zip(decays, h, self.B())]


def _prepare(x, A, B, C, D, dt_bias):
  """The kernels' views of the inputs: per-channel parameters as rows log2(e) A^T (n), D, dt_bias
  of one f32 array (one copy brings them all); B and C in float32 with groups and states on one
  axis. B_t and C_t are read once per state and step: in bf16 each read also costs a shift out of
  its packed pair (13% of the backward's instructions, 25% of the forward's: kernels/NOTES.md),
  while the conversion here is 2 x 1 MB at Mamba's sizes."""
  batch, padded_length, _ = x.shape
  groups, n = B.shape[2:]
  params = jnp.concatenate([A.T * _LOG2_E, D[None], dt_bias[None]]).astype(jnp.float32)
  flat = lambda a: a.reshape(batch, padded_length, groups * n).astype(jnp.float32)
  return params, flat(B), flat(C)


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


def _gate(z):
  """silu(z) = z sigmoid(z) with the reciprocal as the square of rsqrt.approx (2^-22.9 relative
  error, kernels/NOTES.md v5): Lane semantics lowers 1 / v to div.rn.f32, about ten instructions
  with its Newton steps and slow path, against rsqrt's one and a multiply. 1 + e^-z >= 1."""
  r = jax.lax.rsqrt(1.0 + jnp.exp(-z))
  return z * (r * r)


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
  multiple of chunk steps; steps from `length` on leave the state alone.

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
  channels = FORWARD_CHANNELS
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
  # Parameter rows: log2(e) A^T (n), then D and dt_bias, each repeated `subsets` times so that
  # a (subsets, channels) view gives every lane its channel's value.
  params = jnp.concatenate([A.T * _LOG2_E, jnp.tile(D[None], (subsets, 1)),
                            jnp.tile(dt_bias[None], (subsets, 1))]).astype(f32)
  # B and C arrive in their own dtype, groups and states on one axis: the kernel converts them.
  B, C = (a.reshape(batch, padded_length, groups * n) for a in (B, C))
  h0 = jnp.swapaxes(h0, 1, 2).astype(f32)
  seq_inputs = [x, dt] + [z] * has_z

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
      for src, dst in zip(refs[:len(seq_inputs)], seq_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, cols], dst.at[slot], bars.at[slot])
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
  """The gradients of `forward`, given its saved chunk states (batch, chunks, n, d).

  Returns dx, ddt, dz (None without z) in the inputs' dtypes; dB and dC as partial sums over the
  channels of one block and one warpgroup's share of the reduction tile,
  (batch, d / 128 * BACKWARD_WARPGROUPS, padded length, n) float32; and float32 per-batch
  dA (batch, d, n), dD and ddt_bias (batch, d), dh0 (batch, d, n).
  """
  batch, padded_length, d = x.shape
  groups, n = B.shape[2:]
  num_chunks = padded_length // chunk
  steps = _reduction_steps(n)  # steps per reduction tile
  span = min(BACKWARD_SPAN, steps)  # steps recomputed in registers at once
  spans = chunk // span
  tiles = chunk // steps  # reduction tiles per chunk
  blocks = d // CHANNELS
  has_z = z is not None
  wgs = BACKWARD_WARPGROUPS
  m = n // wgs  # states per warpgroup
  columns = CHANNELS // wgs  # of the reduction tile, summed by one warpgroup
  params, B, C = _prepare(x, A, B, C, D, dt_bias)
  dh_last = jnp.swapaxes(dh_last, 1, 2).astype(jnp.float32)
  # x, dt and z's buffers take dx, ddt and dz once a step has read them: one slot per input.
  seq_inputs = [x, dt] + [z] * has_z + [dy]
  # Each warpgroup's per-step sums over its states, which the warpgroups add up for dx, ddt and
  # dz: of dh_i B_i, of dh_i h_i e_i A'_i and (with the gate) of h_i C_i.
  num_parts = 2 + has_z

  def selective_scan_backward(*refs):  # the name profilers show
    num_seq = len(seq_inputs)
    seq_g = refs[:num_seq]
    B_g, C_g, params_g, chunks_g, dh_last_g = refs[num_seq:num_seq + 5]
    grads_g = refs[num_seq + 5:num_seq + 5 + num_seq - 1]  # dx, ddt, dz
    dbc_g, dA_g, dh0_g, sums_g = refs[2 * num_seq + 4:2 * num_seq + 8]
    (*seq_s, B_s, C_s, starts_s, terms_s, parts_s, dbc_s, sums_s, bars, setup_bar, tile_bars,
     free_bar) = refs[2 * num_seq + 8:]
    bc_s = (B_s, C_s)
    b = jax.lax.axis_index("b")
    c = jax.lax.axis_index("c")
    wg = jax.lax.axis_index("wg")
    first = wg * m  # this warpgroup's states are first .. first + m - 1
    states = [first + i for i in range(m)]
    my_states = pl.ds(first, m)
    cols = pl.ds(c * CHANNELS, CHANNELS)
    group_cols = pl.ds((c * CHANNELS) // (d // groups) * n, n)

    def lead(body):
      """Runs body in the first warpgroup only: it issues the input copies, stores dx and ddt."""
      return pl.when(wg == 0)(body)

    def last(body):
      """Runs body in the last warpgroup only: it stores dz."""
      return pl.when(wg == wgs - 1)(body)

    # The parameters, read once into registers, arrive in buffers not used before then (shared
    # memory is short with float32 inputs): A' in the second saved-state slot, which the second
    # chunk's copy fills, D and dt_bias in sums_s, which takes dD and ddt_bias at the end.
    @lead
    def _():
      plgpu.copy_gmem_to_smem(params_g.at[pl.ds(0, n), cols], starts_s.at[1], setup_bar)
      plgpu.copy_gmem_to_smem(params_g.at[pl.ds(n, 2), cols], sums_s, setup_bar)
      plgpu.copy_gmem_to_smem(dh_last_g.at[b, :, cols], starts_s.at[2], setup_bar)

    plgpu.barrier_wait(setup_bar)
    A_rows = [starts_s[1, i] for i in states]  # log2(e) A
    D_row, bias_row = sums_s[0], sums_s[1]
    # The loop's carry must enter in the layout the body gives it (a load's, not a constant's):
    # zeros go through this warpgroup's own part of parts_s. Each thread reads back only the
    # column it wrote, of it and of starts_s, so neither needs a barrier.
    parts_s[wg, 0, 0] = jnp.zeros((CHANNELS,), jnp.float32)
    zeros = parts_s[wg, 0, 0]
    # dD and ddt_bias need the sums over all states: every warpgroup carries the same ones.
    carry = (tuple(starts_s[2, i] for i in states), (zeros,) * m, zeros, zeros)

    def fetch(k, slot):
      rows = pl.ds(k * chunk, chunk)
      for src, dst in zip(seq_g, seq_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, cols], dst.at[slot], bars.at[slot])
      for src, dst in zip((B_g, C_g), bc_s):
        plgpu.copy_gmem_to_smem(src.at[b, rows, group_cols], dst.at[slot], bars.at[slot])
      plgpu.copy_gmem_to_smem(chunks_g.at[b, k, :, cols], starts_s.at[slot], bars.at[slot])

    lead(lambda: fetch(num_chunks - 1, 0))
    # The tile and parts_s are ordered between warpgroups by two mbarriers (which the interpreter
    # runs too), each arrived at by every thread: `tile_written` after a tile's terms and partial
    # sums are stored, waited for before they are read; `tile_read` arrived at once a warpgroup
    # has read them, waited for just before the next tile's first store, so that the wait hides
    # behind that tile's recompute (backward 1.14 -> 1.10 ms on an H100 against arriving and
    # waiting at once). One arrival here stands for the tile before the first.
    tile_written, tile_read = tile_bars.at[0], tile_bars.at[1]
    plgpu.barrier_arrive(tile_read)

    def adjoint_step(step, decay, h_prev, h, dh, dA, slot, t, local_t):
      """Back-propagates through one step for this warpgroup's states, given their decays and
      states before and after it; writes the step's dB_t, dC_t terms into the reduction tile and
      its partial sums into parts_s. Returns the new dh and dA, and the step's gated dy (and
      with the gate, dy, z and sigmoid(z)) for the outputs."""
      dy_raw = seq_s[-1][slot, t].astype(jnp.float32)
      dyv, gate = dy_raw, None
      C_t = step.C()
      if has_z:
        zv = seq_s[2][slot, t].astype(jnp.float32)
        sig = sigmoid(zv)
        dyv, gate = dy_raw * zv * sig, (dy_raw, zv, sig)
      dh = [dhi + dyv * ci for dhi, ci in zip(dh, C_t)]
      drive = step.dt * step.x
      row = local_t * 2 * n
      for i, state in enumerate(states):
        terms_s[row + state, pl.ds(0, CHANNELS)] = dh[i] * drive
        terms_s[row + n + state, pl.ds(0, CHANNELS)] = dyv * h[i]
      through = [dhi * hp * e for dhi, hp, e in zip(dh, h_prev, decay)]
      parts = [_tree_sum([dhi * bi for dhi, bi in zip(dh, step.B())]),
               _tree_sum([th * a for th, a in zip(through, A_rows)])]
      if has_z:
        parts.append(_tree_sum([hi * ci for hi, ci in zip(h, C_t)]))
      for q, part in enumerate(parts):
        parts_s[wg, q, local_t] = part
      return ([dhi * e for dhi, e in zip(dh, decay)],
              [da + th * step.dt for da, th in zip(dA, through)], dyv, gate)

    def outputs(step, dyv, gate, dD, dbias, slot, t, local_t):
      """dx, ddt and dz of one step from the warpgroups' partial sums; dD and ddt_bias added up.
      The stores overwrite the step's x, dt and z, which every warpgroup has read by now."""
      d_drive, through_a, *y_part = [
          _tree_sum([parts_s[w, q, local_t] for w in range(wgs)]) for q in range(num_parts)]
      ddt = d_drive * step.x + through_a * (1.0 / _LOG2_E)
      if softplus:
        ddt = ddt * sigmoid(step.dt_raw)
      if step.valid is not None:
        ddt = ddt * step.valid

      @lead
      def _():
        dx = d_drive * step.dt + dyv * D_row
        seq_s[0][slot, t] = dx.astype(seq_s[0].dtype)
        seq_s[1][slot, t] = ddt.astype(seq_s[1].dtype)

      if has_z:
        @last
        def _():
          dy_raw, zv, sig = gate
          y_pre = y_part[0] + D_row * step.x
          seq_s[2][slot, t] = (dy_raw * y_pre * sig * (1.0 + zv * (1.0 - sig))).astype(
              seq_s[2].dtype)
      return dD + dyv * step.x, dbias + ddt

    def chunk_body(i, carry):
      k = num_chunks - 1 - i
      slot = i % 2
      plgpu.barrier_wait(bars.at[slot])
      read = lambda slot_t: _Step(seq_s, bc_s, slot, slot_t, k * chunk, bias_row, states=states,
                                  length=length, chunk=chunk, softplus=softplus)
      # The state at the start of every span s: starts_s[start(s)]. The saved one, span 0's,
      # came into starts_s[slot]; span s > 0's goes to starts_s[s + 1]. Each warpgroup reads
      # and writes only its own states' rows.
      start = lambda s: s + 1 - (s == 0) * (s + 1 - slot)

      def span_start(s, h):
        for t in range(span):
          step = read((s - 1) * span + t)
          h = step.advance(h, step.decays(A_rows))
        for j, state in enumerate(states):
          starts_s[s + 1, state] = h[j]
        return h

      jax.lax.fori_loop(1, spans, span_start, [starts_s[slot, j] for j in states])
      # The previous chunk's gradient copies must have read the other slot before it refills,
      # and dbc_s before the tiles below rewrite it; waiting here, after the span pass, gives
      # them that pass's time. Each warpgroup waits for its own copies; the first one, which
      # refills, for the others' through free_bar.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if wgs > 1:
        pl.when(wg > 0)(lambda: plgpu.barrier_arrive(free_bar))
        lead(lambda: plgpu.barrier_wait(free_bar))

      @lead
      def _():
        @pl.when(k > 0)
        def _():
          fetch(k - 1, 1 - slot)

      def tile_body(i, carry):
        """The adjoint through the steps of one reduction tile, last step first; then the
        tile's row sums and the steps' outputs."""
        dh, dA, dD, dbias = carry
        tile = tiles - 1 - i
        done = []
        for local in reversed(range(steps // span)):
          s = tile * (steps // span) + local
          h = [starts_s[start(s), j] for j in states]
          span_steps = [read(s * span + t) for t in range(span)]
          states_at, decays = [h], []
          for step in span_steps:
            decays.append(step.decays(A_rows))
            states_at.append(step.advance(states_at[-1], decays[-1]))
          # The adjoint reuses the span's decays: n registers a step instead of n more exps
          # (4.33 against 4.48 ms for the backward on an H100: kernels/NOTES.md).
          for t in reversed(range(span)):
            local_t = local * span + t
            if not done:  # this tile's first store comes next
              plgpu.barrier_wait(tile_read)
            dh, dA, dyv, gate = adjoint_step(span_steps[t], decays[t], states_at[t],
                                             states_at[t + 1], dh, dA, slot, s * span + t,
                                             local_t)
            done.append((span_steps[t], dyv, gate, s * span + t, local_t))
        plgpu.barrier_arrive(tile_written)
        plgpu.barrier_wait(tile_written)
        # Thread r sums its warpgroup's columns of row r: one step's dB or dC term for one
        # state over a share of the block's channels.
        col = lambda j: terms_s[pl.ds(0, CHANNELS), wg * columns + j]
        partial = [col(j) for j in range(8)]
        for j in range(8, columns):
          partial[j % 8] = partial[j % 8] + col(j)
        dbc_s[wg, tile] = _tree_sum(partial)
        for step, dyv, gate, t, local_t in done:
          dD, dbias = outputs(step, dyv, gate, dD, dbias, slot, t, local_t)
        plgpu.barrier_arrive(tile_read)
        return tuple(dh), tuple(dA), dD, dbias

      carry = jax.lax.fori_loop(0, tiles, tile_body, carry)
      plgpu.commit_smem()  # the TMA stores below read what the threads wrote
      rows = pl.ds(k * chunk, chunk)

      @lead
      def _():
        for src, dst in zip(seq_s[:2], grads_g[:2]):
          plgpu.copy_smem_to_gmem(src.at[slot], dst.at[b, rows, cols])

      if has_z:
        last(lambda: plgpu.copy_smem_to_gmem(seq_s[2].at[slot], grads_g[2].at[b, rows, cols]))
      plgpu.copy_smem_to_gmem(dbc_s.at[wg], dbc_g.at[b, c, wg, pl.ds(k * tiles, tiles)])
      return carry

    dh, dA, dD, dbias = jax.lax.fori_loop(0, num_chunks, chunk_body, carry)
    plgpu.barrier_wait(tile_read)  # the last tile's arrivals: no phase goes unobserved
    for j, state in enumerate(states):
      starts_s[0, state] = dA[j]
      starts_s[1, state] = dh[j]

    @lead
    def _():
      sums_s[0] = dD
      sums_s[1] = dbias

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(starts_s.at[0, my_states], dA_g.at[b, my_states, cols])
    plgpu.copy_smem_to_gmem(starts_s.at[1, my_states], dh0_g.at[b, my_states, cols])
    lead(lambda: plgpu.copy_smem_to_gmem(sums_s, sums_g.at[b, :, cols]))
    plgpu.wait_smem_to_gmem(0)

  f32 = jnp.float32
  out_type = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in seq_inputs[:-1]]
              + [jax.ShapeDtypeStruct((batch, blocks, wgs, padded_length // steps, CHANNELS), f32),
                 jax.ShapeDtypeStruct((batch, n, d), f32), jax.ShapeDtypeStruct((batch, n, d), f32),
                 jax.ShapeDtypeStruct((batch, 2, d), f32)])
  scratch = ([plgpu.SMEM((2, chunk, CHANNELS), a.dtype) for a in seq_inputs]
             + [plgpu.SMEM((2, chunk, n), a.dtype) for a in (B, C)]
             # The saved chunk states (two slots), then the span starts they lead to.
             + [plgpu.SMEM((spans + 1, n, CHANNELS), f32),
                # One word of padding per row: row r's word col sits in bank (r + col) % 32.
                plgpu.SMEM((CHANNELS, CHANNELS + 1), f32),
                plgpu.SMEM((wgs, num_parts, steps, CHANNELS), f32),
                plgpu.SMEM((wgs, tiles, CHANNELS), f32), plgpu.SMEM((2, CHANNELS), f32),
                plgpu.Barrier(num_arrivals=len(seq_inputs) + 3, num_barriers=2),
                plgpu.Barrier(num_arrivals=3),
                plgpu.Barrier(num_arrivals=wgs, num_barriers=2),
                plgpu.Barrier(num_arrivals=max(wgs - 1, 1))])
  call = plgpu.kernel(
      selective_scan_backward, out_type=out_type, scratch_types=scratch, grid=(batch, blocks),
      grid_names=("b", "c"), num_threads=wgs, thread_name="wg", interpret=interpret,
      compiler_params=_compiler_params())
  outs = call(*seq_inputs, B, C, params, chunks, dh_last)
  dx, ddt = outs[0], outs[1]
  dz = outs[2] if has_z else None
  dbc, dA, dh0, sums = outs[2 + has_z:]
  # Block c's warpgroup w is partial c * wgs + w: the blocks of a group stay contiguous.
  dbc = dbc.reshape(batch, blocks * wgs, padded_length, 2, n)
  return (dx, ddt, dz, dbc[..., 0, :], dbc[..., 1, :], jnp.swapaxes(dA, 1, 2), sums[:, 0],
          sums[:, 1], jnp.swapaxes(dh0, 1, 2))
