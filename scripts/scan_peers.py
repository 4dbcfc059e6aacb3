"""The peers that `scripts/bench_scan.py --compare` runs beside our scan kernels (issue 4), through torch.

  mamba_ssm selective_scan_cuda   mamba_ssm's CUDA selective scan, built by
                                  scripts/build_mamba_ssm_peer.sh (it needs nvcc and a CUDA torch)
  fla chunk_simple_gla            flash-linear-attention's Triton kernels (the fla_core wheel)

A peer takes one of bench_scan's input sets (jax arrays in our layouts) and makes the kernel's own
arguments from it once, on the GPU, outside the timing: its layouts, contiguous, as the peer's own
model hands them to the kernel. It then computes the same function as ours (for the selective scan
the same D, z gate, dt bias and softplus as Mamba's mixer), and `ours` turns its output and input
gradients back into our layouts, so that --check compares them with the float32 reference as it
does our impls. Constructing a peer raises ImportError where torch or the peer is missing.

Times are taken as for ours: the median wall time of a call, synchronizing after each; and the
device time per call, here CUDA events around calls queued back to back (the kernels and the gaps
between them), where ours sums its kernels' durations from a profiler trace.
"""

import jax
import jax.numpy as jnp

from seqmodels import profiling


def _to_torch(array):
  """A jax array as a torch tensor on the same device, sharing its memory (dlpack)."""
  import torch
  return torch.from_dlpack(jax.block_until_ready(array))


def _to_jax(tensor):
  """A torch tensor as a float32 jax array, through the host (only --check's small shapes)."""
  return jnp.asarray(tensor.detach().float().cpu().numpy())


class MambaSsmPeer:
  """mamba_ssm's selective_scan_cuda, its fwd and bwd called as mamba_ssm's SelectiveScanFn calls
  them (mamba_ssm/ops/selective_scan_interface.py), without autograd around them."""

  label = "mamba_ssm CUDA"

  def __init__(self):
    import torch  # noqa: F401  (loads the libraries that the extension links against)
    import selective_scan_cuda
    self.kernel = selective_scan_cuda

  def arguments(self, ins, dy=None):
    """Our inputs and output cotangent (ones by default) as the kernel's: x, dt, z and dy channels
    first, (batch, d, length), as Mamba's mixer makes them; B and C as one group, (batch, 1, n,
    length); A, D and dt_bias float32 as ours."""
    channels_first = lambda a: _to_torch(a).transpose(1, 2).contiguous()  # noqa: E731
    one_group = lambda a: _to_torch(a).transpose(1, 2).unsqueeze(1).contiguous()  # noqa: E731
    u = channels_first(ins["x"])
    dout = u.new_ones(u.shape) if dy is None else channels_first(dy).to(u.dtype)
    return dict(u=u, delta=channels_first(ins["dt"]), A=_to_torch(ins["A"]),
                B=one_group(ins["B"]), C=one_group(ins["C"]), D=_to_torch(ins["D"]),
                z=channels_first(ins["z"]), delta_bias=_to_torch(ins["dt_bias"]), dout=dout)

  def _forward(self, a):
    """[out before the gate, the chunk-boundary states the backward reads, out * silu(z)]."""
    return self.kernel.fwd(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                           a["delta_bias"], True)

  def forward(self, a):
    return self._forward(a)[2]

  def forward_backward(self, a):
    """(output, input gradients by our names), in the kernel's layouts."""
    out, chunk_states, out_z = self._forward(a)
    # No preallocated dz and no recomputed out_z, as SelectiveScanFn.backward asks.
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = self.kernel.bwd(
        a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], a["dout"],
        chunk_states, out, None, True, False)
    return out_z, dict(x=du, dt=ddelta, A=dA, B=dB, C=dC, D=dD, z=dz, dt_bias=ddelta_bias)

  def ours(self, y, grads):
    """The output and gradients in our layouts, float32 jax arrays."""
    channels_last = lambda t: _to_jax(t.transpose(1, 2))  # noqa: E731
    from_group = lambda t: _to_jax(t.squeeze(1).transpose(1, 2))  # noqa: E731
    layouts = dict(x=channels_last, dt=channels_last, z=channels_last, B=from_group, C=from_group)
    return channels_last(y), {k: layouts.get(k, _to_jax)(t) for k, t in grads.items()}


class FlaSimpleGlaPeer:
  """fla's chunk_simple_gla through its autograd function. Its layout is ours, (batch, length,
  heads, dim); our log_decay is its g, and its scale is 1 since our q carries the scale."""

  label = "fla chunk_simple_gla"
  grad_names = ("q", "k", "v", "log_decay")

  def __init__(self):
    from fla.ops.simple_gla import chunk_simple_gla
    self.kernel = chunk_simple_gla

  def arguments(self, ins, do=None):
    """Our inputs as leaf tensors that require gradients, and the output cotangent (ones by default)."""
    a = {k: _to_torch(v).requires_grad_(True) for k, v in ins.items()}
    v = a["v"].detach()
    return {**a, "do": v.new_ones(v.shape) if do is None else _to_torch(do).to(v.dtype)}

  def _forward(self, a):
    return self.kernel(a["q"], a["k"], a["v"], g=a["log_decay"], scale=1.0)[0]

  def forward(self, a):
    import torch
    with torch.no_grad():
      return self._forward(a)

  def forward_backward(self, a):
    import torch
    o = self._forward(a)
    grads = torch.autograd.grad(o, [a[name] for name in self.grad_names], a["do"])
    return o, dict(zip(self.grad_names, grads))

  def ours(self, y, grads):
    return _to_jax(y), {k: _to_jax(t) for k, t in grads.items()}


def wall_ms(fn, arg_sets, repeats):
  """Median wall time of fn over repeats calls, cycling through arg_sets, synchronizing after each
  call (as block_until_ready does for ours), after one warm-up call per set."""
  import torch
  return profiling.median_wall_ms(fn, arg_sets, repeats, lambda _: torch.cuda.synchronize())


def device_ms(fn, arg_sets, repeats):
  """Device time per call: CUDA events around repeats calls queued back to back, behind one more
  call that keeps the GPU busy while the host queues the first timed one. Where the host queues a
  call more slowly than the GPU runs it, this is the host's time: an upper bound on the kernels'."""
  import torch
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  fn(arg_sets[-1])
  start.record()
  for i in range(repeats):
    fn(arg_sets[i % len(arg_sets)])
  end.record()
  end.synchronize()
  return start.elapsed_time(end) / repeats


def time_peer(peer, sets, repeats, device_time=False):
  """(forward ms, forward+backward ms, and with device_time their device ms, else None) of peer on
  bench_scan's input sets. A backward the peer refuses is reported and timed as nan."""
  arg_sets = [peer.arguments(ins) for ins in sets]
  fwd = wall_ms(peer.forward, arg_sets, repeats)
  fwd_device = device_ms(peer.forward, arg_sets, repeats) if device_time else None
  try:
    fwd_bwd = wall_ms(peer.forward_backward, arg_sets, repeats)
    fwd_bwd_device = device_ms(peer.forward_backward, arg_sets, repeats) if device_time else None
  except Exception as error:  # fla refuses its Hopper backward under some Triton versions.
    print(f"{peer.label} backward: failed: {type(error).__name__}: {error}"[:300], flush=True)
    fwd_bwd = float("nan")
    fwd_bwd_device = float("nan") if device_time else None
  return fwd, fwd_bwd, fwd_device, fwd_bwd_device


def outputs_and_grads(peer, ins, dy):
  """peer's output and input gradients for inputs ins and output cotangent dy, in our layouts
  (float32 jax arrays); only the output where the peer refuses its backward."""
  args = peer.arguments(ins, dy)
  try:
    return peer.ours(*peer.forward_backward(args))
  except Exception as error:  # fla refuses its Hopper backward under some Triton versions.
    print(f"{peer.label} backward: failed: {type(error).__name__}: {error}"[:300], flush=True)
    return peer.ours(peer.forward(args), {})
