"""Times the scan kernels (issue 4): forward and forward+backward, per impl and shape, against the HBM floor.

  python scripts/bench_scan.py                      # default shapes, every impl of every workload
  python scripts/bench_scan.py --workload selective_scan --impl pallas associative
  python scripts/bench_scan.py --seq                # lengths 512 .. 16384: time should grow linearly
  python scripts/bench_scan.py --compare            # adds the peers that are installed
  python scripts/bench_scan.py --workload linear_attention --compare   # with fla's chunk_simple_gla
  bash scripts/build_mamba_ssm_peer.sh mamba_ssm-2.3.2.post1.tar.gz /tmp/mamba_peer && \
      PYTHONPATH=/tmp/mamba_peer:$PYTHONPATH python scripts/bench_scan.py --workload selective_scan \
      --compare --check                             # with mamba_ssm's CUDA selective scan
  python scripts/bench_scan.py --check              # first checks each impl against a float32 reference
  python scripts/bench_scan.py --impl pallas --device_time   # adds each call's device (kernel) time
  python scripts/bench_scan.py --workload selective_scan --impl pallas pallas_triton  # Mosaic vs Triton
  python scripts/bench_scan.py --mixer              # times the Mamba-130m mixer around the scan
  python scripts/bench_scan.py --mixer --fused --check --impl pallas   # fused_inner vs unfused
  python scripts/bench_scan.py --workload selective_scan --impl pallas --variants '' \
      selective_scan_gpu.BACKWARD_SPAN=2            # kernel variants side by side in one run
  ncu --kernel-name regex:mosaic_gpu python scripts/bench_scan.py --workload selective_scan \
      --impl pallas --once                          # one forward+backward each, for a profiler

For each impl and shape it prints the median forward and forward+backward times (block_until_ready
around each call, after warm-up, rotating over several input sets so repeated calls do not hit the
cache), the achieved bandwidth (bytes that must move / time) and the ratio of the time to the HBM
floor (bytes that must move / copy bandwidth, measured at the start of the same run). Wall time
holds each call's host dispatch (0.1-0.4 ms a call on an H100, kernels/NOTES.md); --device_time
adds the device time per call, the summed durations of its device ops in a jax.profiler trace of
--repeats calls (kernels only, as CUDA events around the kernels would give).

--compare runs the installed peers (scripts/scan_peers.py: mamba_ssm's selective_scan_cuda, fla's
chunk_simple_gla) through torch on the same input sets, in the same run and table, computing the
same function (for the selective scan: D, the z gate, dt_bias and softplus); with --check their
output and input gradients are checked against the float32 reference as ours are. A peer's device
time is CUDA events around its calls queued back to back.

A workload is one op and its default shape: it makes the inputs, runs an impl, and counts the
bytes. `WORKLOADS` maps names to them; a new op adds one class and one entry.
"""

import argparse
import functools
import itertools
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import kernels  # noqa: E402
import scan_peers  # noqa: E402  scripts/scan_peers.py
from kernels import linear_attention, selective_scan  # noqa: E402
from seqmodels import profiling  # noqa: E402

SEQ_SWEEP = (512, 1024, 2048, 4096, 8192, 16384)


def median_ms(fn, input_sets, repeats):
  """Median wall time of fn over repeats calls, cycling through input_sets, after one warm-up each."""
  return profiling.median_wall_ms(lambda inputs: fn(*inputs), input_sets, repeats, jax.block_until_ready)


def copy_bandwidth(repeats):
  """Bytes read plus written per second by a large device-to-device elementwise pass."""
  size = 1 << (29 if jax.default_backend() != "cpu" else 24)  # 1 GiB of bf16 on accelerators
  sets = [(jnp.full((size,), float(i), jnp.bfloat16),) for i in range(2)]
  ms = median_ms(jax.jit(lambda a: a + 1), sets, repeats)
  return 2 * 2 * size / (ms * 1e-3)


class SelectiveScan:
  """Mamba's selective scan as the Mamba mixer calls it: D, z gate, dt_bias and softplus, bf16."""

  name = "selective_scan"
  # "pallas_triton": the pallas impl with its forward and backward through Triton, not Mosaic GPU.
  impls = ("pallas", "pallas_triton", "associative", "reference")
  default_shape = dict(batch=8, length=2048, d=1536, n=16)

  def inputs(self, seed, batch, length, d, n, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 8)
    seq = (batch, length, d)
    normal = lambda k, shape, scale=1.0: (scale * jax.random.normal(k, shape)).astype(dtype)
    return dict(
        x=normal(keys[0], seq), dt=(normal(keys[1], seq, 0.5) - 2).astype(dtype),
        A=-jnp.exp(jax.random.uniform(keys[2], (d, n), minval=0.0, maxval=2.5)),
        B=normal(keys[3], (batch, length, n)), C=normal(keys[4], (batch, length, n)),
        D=jnp.ones((d,)), z=normal(keys[5], seq),
        dt_bias=jax.random.uniform(keys[6], (d,), minval=-4.0, maxval=-2.0))

  def run(self, impl, inputs, **flags):
    if impl == "pallas_triton":
      from kernels import selective_scan_pallas
      saved, selective_scan_pallas.GPU_KERNELS = selective_scan_pallas.GPU_KERNELS, "triton"
      try:
        return selective_scan(**inputs, **flags, dt_softplus=True, impl="pallas")
      finally:
        selective_scan_pallas.GPU_KERNELS = saved
    return selective_scan(**inputs, **flags, dt_softplus=True, impl=impl)

  def check_cases(self, shape):
    """(label, inputs, flags) that --check runs: the timed configuration, then the options it
    leaves out: h0, reverse and the final state (with its own cotangent); groups, float32 inputs
    and a length that is not a whole number of chunks."""
    timed = self.inputs(99, **shape)
    batch, d, n = shape["batch"], shape["d"], shape["n"]
    h0 = jax.random.normal(jax.random.key(98), (batch, d, n))
    odd = {**shape, "length": shape["length"] - 5}
    grouped = self.inputs(97, **odd, dtype=jnp.float32)
    bc = jax.random.normal(jax.random.key(96), (2, batch, odd["length"], 2, n))
    return [("mamba", timed, {}),
            ("h0 reverse state", {**timed, "h0": h0}, dict(reverse=True, return_state=True)),
            ("groups 2, float32, odd length", {**grouped, "B": bc[0], "C": bc[1]}, {})]

  def bytes_moved(self, batch, length, d, n, dtype=jnp.bfloat16):
    """(forward, forward+backward) bytes that must cross HBM: each input read once, output written once."""
    size = jnp.dtype(dtype).itemsize
    seq, bc = batch * length * d * size, batch * length * n * size
    forward = 4 * seq + 2 * bc  # read x, dt, z, B, C; write y
    backward = 7 * seq + 4 * bc  # read x, dt, z, B, C, dy; write dx, ddt, dz, dB, dC
    return forward, forward + backward

  def peers(self):
    """Peers by name: a TorchPeer where it is installed, else a line saying why it is missing."""
    try:
      return {"mamba_ssm selective_scan_cuda": scan_peers.MambaSsmPeer()}
    except ImportError as error:
      return {"mamba_ssm selective_scan_cuda": f"not installed ({error}); "
                                               "scripts/build_mamba_ssm_peer.sh builds it"}

  # Measured side by side on an H100 (issue 4), batch 8, length 2048, d 1536, n 16, bf16.
  published = {"mamba_ssm CUDA (issue 4)": (0.42, 2.30), "associative fp32 (issue 4)": (3.79, 13.9)}


class LinearAttention:
  """Decayed linear attention as GLA / simple-GLA layers call it: per-token scalar decay, bf16."""

  name = "linear_attention"
  impls = ("pallas", "chunked")
  default_shape = dict(batch=8, length=2048, heads=24, dk=128, dv=64)

  def inputs(self, seed, batch, length, heads, dk, dv, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    normal = lambda k, d, scale=1.0: (scale * jax.random.normal(k, (batch, length, heads, d))).astype(dtype)
    # Per-step decays between 0.82 and 0.99.
    return dict(q=normal(keys[0], dk, dk**-0.5), k=normal(keys[1], dk), v=normal(keys[2], dv),
                log_decay=jax.random.uniform(keys[3], (batch, length, heads), minval=-0.2, maxval=-0.01))

  def run(self, impl, inputs, **flags):
    return linear_attention(**inputs, **flags, impl=impl)

  def check_cases(self, shape):
    """(label, inputs, flags) that --check runs: the timed configuration, then the options it leaves
    out: h0, reverse and the final state; no decay, one per head and one per key channel; float32
    inputs; a length that is not a whole number of chunks; dk and dv swapped."""
    timed = self.inputs(99, **shape)
    batch, length, heads, dk, dv = (shape[n] for n in ("batch", "length", "heads", "dk", "dv"))
    h0 = jax.random.normal(jax.random.key(98), (batch, heads, dk, dv))
    odd = {**shape, "length": length - 5}
    per_channel = jax.random.uniform(jax.random.key(97), (batch, odd["length"], heads, dk),
                                     minval=-0.2, maxval=-0.01)
    per_head = jax.random.uniform(jax.random.key(96), (heads,), minval=-0.2, maxval=-0.01)
    return [("per-token decay", timed, {}),
            ("h0 reverse state", {**timed, "h0": h0}, dict(reverse=True, return_state=True)),
            ("no decay, odd length", {**self.inputs(95, **odd), "log_decay": None}, {}),
            ("per-head decay, float32", {**self.inputs(94, **shape, dtype=jnp.float32),
                                         "log_decay": per_head}, {}),
            ("per-channel decay, odd length, h0 reverse state",
             {**self.inputs(93, **odd), "log_decay": per_channel, "h0": h0},
             dict(reverse=True, return_state=True)),
            ("dk 64, dv 128", self.inputs(92, **{**shape, "dk": 64, "dv": 128}), {})]

  def bytes_moved(self, batch, length, heads, dk, dv, dtype=jnp.bfloat16):
    """(forward, forward+backward) bytes that must cross HBM: each input read once, output written once."""
    size = jnp.dtype(dtype).itemsize
    qk, v, g = batch * length * heads * dk * size, batch * length * heads * dv * size, batch * length * heads * 4
    forward = 2 * qk + 2 * v + g  # read q, k, v, log_decay; write o
    backward = 4 * qk + 3 * v + 2 * g  # read q, k, v, log_decay, do; write dq, dk, dv, dlog_decay
    return forward, forward + backward

  def peers(self):
    """Peers by name: a TorchPeer where it is installed, else a line saying why it is missing."""
    try:
      return {"fla chunk_simple_gla": scan_peers.FlaSimpleGlaPeer()}
    except ImportError as error:
      return {"fla chunk_simple_gla": f"not installed ({error})"}

  # Measured side by side on an H100 (issue 4), batch 8, length 2048, 24 heads, dk 128, dv 64.
  published = {"fla chunk_simple_gla (issue 4)": (0.49, float("nan")),
               "mamba_ssm SSD Triton (issue 4)": (0.60, 4.9)}


WORKLOADS = {"selective_scan": SelectiveScan(), "linear_attention": LinearAttention()}


def device_ms(fn, inputs, repeats):
  """Device time per call of jitted fn: its device ops' summed durations in a jax.profiler trace of
  `repeats` calls (kernels only, no host dispatch); None where the backend traces no device ops."""
  compiled = fn.lower(*inputs).compile()

  def run():
    jax.block_until_ready([compiled(*inputs) for _ in range(repeats)])

  with tempfile.TemporaryDirectory(prefix="bench_scan_trace_") as directory:
    summary = profiling.trace(run, directory, hlo_text=compiled.as_text(), steps=repeats)
  return summary.get("device_ms_per_step")


def time_impl(workload, impl, shape, sets, repeats, device_time=False):
  """(forward ms, forward+backward ms, and with device_time their device ms or None) of impl on the
  input sets."""
  forward = jax.jit(lambda ins: workload.run(impl, ins))

  @jax.jit
  def forward_backward(ins, cotangent):
    _, vjp = jax.vjp(lambda i: workload.run(impl, i), ins)
    return vjp(cotangent)

  cotangents = [jnp.ones_like(forward(ins)) for ins in sets]
  fwd = median_ms(forward, [(ins,) for ins in sets], repeats)
  print(f"{workload.name} {impl} {shape}: forward {fwd:.3f} ms", flush=True)
  fwd_bwd = median_ms(forward_backward, list(zip(sets, cotangents)), repeats)
  if not device_time:
    return fwd, fwd_bwd, None, None
  return (fwd, fwd_bwd, device_ms(forward, (sets[0],), repeats),
          device_ms(forward_backward, (sets[0], cotangents[0]), repeats))


def run_once(workload, impl, inputs):
  """One forward+backward of impl, compiled first: each kernel launches once, for a profiler."""
  def forward_backward(ins):
    out, vjp = jax.vjp(lambda i: workload.run(impl, i), ins)
    return vjp(jnp.ones_like(out))

  jax.block_until_ready(jax.jit(forward_backward).lower(inputs).compile()(inputs))


def relative_error(got, want):
  """||got - want|| / ||want|| over all elements, in float32."""
  return float(jnp.linalg.norm((got.astype(jnp.float32) - want).ravel()) / jnp.linalg.norm(want.ravel()))


def random_cotangents(out):
  """Random cotangents for every output, the same for every impl (fixed key), in the outputs' dtypes."""
  keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(out)))
  return jax.tree.unflatten(jax.tree.structure(out), [
      jax.random.normal(k, o.shape).astype(o.dtype) for k, o in zip(keys, jax.tree.leaves(out))])


def outputs_and_grads(workload, impl, ins, flags):
  out, vjp = jax.vjp(lambda i: workload.run(impl, i, **flags), ins)
  return out, vjp(random_cotangents(out))[0]


_reference_results = {}


def reference_results(workload, label, ins, flags, shape):
  """Outputs and input gradients of float32 'reference' on check case `label`, once per run."""
  key = (workload.name, label, tuple(shape.items()))
  if key not in _reference_results:  # one reference per case, whatever the variants
    upcast = jax.tree.map(lambda a: a.astype(jnp.float32), ins)
    _reference_results[key] = jax.jit(
        functools.partial(outputs_and_grads, workload, "reference", flags=flags))(upcast)
  return _reference_results[key]


def check(workload, impl, shape):
  """Per check case: its label, and the relative L2 errors of impl's outputs and input gradients
  against float32 'reference' on the same values (random cotangents for every output)."""
  results = []
  for label, ins, flags in workload.check_cases(shape):
    want = reference_results(workload, label, ins, flags, shape)
    got = jax.jit(functools.partial(outputs_and_grads, workload, impl, flags=flags))(ins)
    out_errs = jax.tree.leaves(jax.tree.map(relative_error, got[0], want[0]))
    results.append((label, out_errs, jax.tree.map(relative_error, got[1], want[1])))
  return results


def check_peer(workload, peer, shape):
  """As check() for a peer, on the first check case (the timed configuration): the peers run
  neither h0, reverse nor the final state."""
  label, ins, flags = workload.check_cases(shape)[0]
  want_out, want_grads = reference_results(workload, label, ins, flags, shape)
  out, grads = scan_peers.outputs_and_grads(peer, ins, random_cotangents(want_out))
  return [(label, [relative_error(out, want_out)],
           {k: relative_error(g, want_grads[k]) for k, g in grads.items()})]


def print_check(name, label, shape, results):
  for case, out_errs, grad_errs in results:
    # An input that is None (no decay) has no gradient.
    grads = (", ".join(f"{k} {v:.1e}" for k, v in grad_errs.items() if v is not None)
             or "none (no backward)")
    print(f"check {name} {label} {shape} {case}: output rel errs "
          + ", ".join(f"{e:.2e}" for e in out_errs) + f"; input-gradient rel errs {grads}", flush=True)


def time_mixer(impls, repeats, fused=False, check_fused=False, batch=8, length=2048):
  """Times the Mamba-130m mixer at batch 8 x 2048 (or --shape batch=..,length=..), bf16: its scan
  inputs, the scan, and the whole.

  The whole minus the scan is what a fused inner path could save at most. With `fused`, the whole
  mixer with model.fused_inner (kernels/mamba_inner.py) is timed beside it on the same inputs, and
  with `check_fused` its output and parameter gradients are first compared with the unfused
  mixer's, both bf16, and with the unfused mixer's in float32.
  """
  from flax import nnx

  from configs import mamba as mamba_config
  from seqmodels.mamba import MambaMixer
  cfg = mamba_config.get_config("130m").model
  sets = [(jax.random.normal(jax.random.key(s), (batch, length, cfg.d_model), jnp.bfloat16),)
          for s in range(2)]
  for impl in impls:
    cfg.scan_impl = impl
    graph, params = nnx.split(MambaMixer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))

    def whole(params, u, fused_inner=False):
      mixer = nnx.merge(graph, params)
      mixer.fused_inner = fused_inner
      return mixer(u)[0]

    def scan_inputs(params, u):
      mixer = nnx.merge(graph, params)
      x, dt, A, B, C, z, _ = mixer.scan_inputs(u)
      return x, dt, A, B, C, z, mixer.D[...], mixer.dt_bias[...]

    def scan_only(x, dt, A, B, C, z, D, dt_bias):
      return selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True, impl=impl)

    def forward_backward(fn):
      @jax.jit
      def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return vjp(jax.tree.map(jnp.ones_like, out))
      return run

    scan_sets = [jax.jit(scan_inputs)(params, *u) for u in sets]
    pieces = {"scan inputs (in_proj, conv, silu, x_proj, dt_proj)": (scan_inputs, [(params, *u) for u in sets]),
              "scan (with D, gate, dt_bias, softplus)": (scan_only, scan_sets),
              "whole mixer (+ out_proj)": (whole, [(params, *u) for u in sets])}
    if fused:
      pieces["whole mixer, fused_inner"] = (functools.partial(whole, fused_inner=True),
                                            [(params, *u) for u in sets])
    for label, (fn, fn_sets) in pieces.items():
      try:
        fwd = median_ms(jax.jit(fn), fn_sets, repeats)
        fwd_bwd = median_ms(forward_backward(fn), fn_sets, repeats)
      except Exception as error:  # A piece that fails to build is reported, not fatal.
        print(f"mixer {impl}: {label}: failed: {type(error).__name__}: {error}"[:2000], flush=True)
        continue
      print(f"mixer {impl}: {label}: forward {fwd:.3f} ms, forward+backward {fwd_bwd:.3f} ms",
            flush=True)
    if check_fused:
      check_fused_mixer(cfg, sets[0][0])


def check_fused_mixer(cfg, u):
  """Prints the relative L2 errors of the fused and the unfused bf16 mixer's output and parameter
  gradients against the unfused mixer computing in float32 (same parameters, same bf16 input)."""
  from flax import nnx

  from seqmodels.mamba import MambaMixer
  weights = jax.random.normal(jax.random.key(9), u.shape, jnp.float32)

  def output_and_grads(dtype, fused_inner):
    mixer = MambaMixer(cfg, dtype=dtype, rngs=nnx.Rngs(0))  # The parameters are float32 in both.
    mixer.fused_inner = fused_inner
    graph, params = nnx.split(mixer)

    def loss(params):
      y = nnx.merge(graph, params)(u.astype(dtype))[0]
      return jnp.sum(y.astype(jnp.float32) * weights), y
    grads, y = jax.jit(jax.grad(loss, has_aux=True))(params)
    return y, grads

  want = output_and_grads(jnp.float32, False)
  for label, fused_inner in (("unfused", False), ("fused_inner", True)):
    got = output_and_grads(jnp.bfloat16, fused_inner)
    errors = jax.tree_util.tree_leaves_with_path(jax.tree.map(relative_error, got[1], want[1]))
    print(f"check mixer {label} bf16 vs unfused float32: output {relative_error(got[0], want[0]):.2e}; "
          + ", ".join(f"{jax.tree_util.keystr(path)} {e:.1e}" for path, e in errors), flush=True)


def shape_overrides(text):
  """--shape's "batch=1,d=64" as {"batch": 1, "d": 64}."""
  return dict((k, int(v)) for k, v in (kv.split("=") for kv in text.split(",") if kv))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
  parser.add_argument("--impl", nargs="*", help="impls to time (default: each workload's list)")
  parser.add_argument("--seq", action="store_true", help="sweep the length from 512 to 16384")
  parser.add_argument("--compare", action="store_true", help="include installed peers")
  parser.add_argument("--check", action="store_true", help="check accuracy before timing")
  parser.add_argument("--mixer", action="store_true", help="time the Mamba-130m mixer's pieces")
  parser.add_argument("--fused", action="store_true",
                      help="with --mixer: time the mixer with model.fused_inner beside it")
  parser.add_argument("--shape", default="", help="overrides of the default shape, e.g. batch=1,d=64")
  parser.add_argument("--set", nargs="*", default=[],
                      help="kernel tuning constants, e.g. selective_scan_pallas.TRITON_WARPS=1 "
                           "selective_scan_gpu.FORWARD_CHANNELS=64")
  parser.add_argument("--variants", nargs="*", default=[""],
                      help="time each impl once per variant, side by side in this run: each a "
                           "comma-separated list of settings as for --set ('' for none)")
  parser.add_argument("--once", action="store_true",
                      help="run each impl's forward+backward once, untimed (under a profiler)")
  parser.add_argument("--device_time", action="store_true",
                      help="also trace each impl's calls and report their device time (kernels only)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--sets", type=int, default=3, help="input sets to rotate over")
  args = parser.parse_args()

  kernels.set_tuning(args.set)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {' '.join(args.set)}",
        flush=True)
  overrides = shape_overrides(args.shape)
  if args.once:
    for name in args.workload:
      workload = WORKLOADS[name]
      for impl, variant in itertools.product(args.impl or workload.impls, args.variants):
        print(f"once: {name} {impl} {variant}", flush=True)
        with kernels.tuned([v for v in variant.split(",") if v]):
          run_once(workload, impl, workload.inputs(0, **{**workload.default_shape, **overrides}))
    return
  bandwidth = copy_bandwidth(args.repeats)
  print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
  if args.mixer:
    time_mixer(args.impl or ("pallas", "associative"), args.repeats, args.fused,
               args.fused and args.check, **shape_overrides(args.shape))
    return
  rows = []
  for name in args.workload:
    workload = WORKLOADS[name]
    impls = args.impl or workload.impls
    lengths = SEQ_SWEEP if args.seq else (workload.default_shape["length"],)
    peers = {}
    if args.compare:
      for peer, found in workload.peers().items():
        installed = not isinstance(found, str)
        print(f"{name} peer {peer}: "
              + ("installed: timed below on the same inputs" if installed else found), flush=True)
        if installed:
          peers[peer] = found
      for peer, (fwd, fwd_bwd) in workload.published.items():
        print(f"{name} published {peer}: forward {fwd} ms, forward+backward {fwd_bwd} ms")
    if "length" in overrides and not args.seq:
      lengths = (overrides["length"],)
    for length in lengths:
      shape = {**workload.default_shape, **overrides, "length": length}
      sets = [workload.inputs(seed, **shape) for seed in range(args.sets)]
      fwd_bytes, fwd_bwd_bytes = workload.bytes_moved(**shape)
      small = {**shape, "length": min(length, 256)}
      for peer_name, peer in peers.items():
        try:
          fwd, fwd_bwd, fwd_device, fwd_bwd_device = scan_peers.time_peer(
              peer, sets, args.repeats, args.device_time)
          if args.check:
            print_check(name, peer.label, small, check_peer(workload, peer, small))
        except Exception as error:  # A peer that fails is reported, not fatal.
          print(f"{name} peer {peer_name} length {length}: failed: {type(error).__name__}: "
                f"{error}"[:2000], flush=True)
          continue
        rows.append((name, peer.label, length, fwd, fwd_bytes / (fwd * 1e-3) / 1e9,
                     fwd / (fwd_bytes / bandwidth * 1e3), fwd_bwd,
                     fwd_bwd / (fwd_bwd_bytes / bandwidth * 1e3), fwd_device, fwd_bwd_device))
        print("  ".join(map(str, rows[-1])), flush=True)
      for impl, variant in itertools.product(impls, args.variants):
        settings = [v for v in variant.split(",") if v]
        label = " ".join([impl] + [v.rsplit(".", 1)[-1] for v in settings])
        with kernels.tuned(settings):
          try:
            fwd, fwd_bwd, fwd_device, fwd_bwd_device = time_impl(workload, impl, shape, sets, args.repeats,
                                                                  args.device_time)
          except Exception as error:  # An impl that fails to build is reported, not fatal.
            print(f"{name} {label} length {length}: failed: {type(error).__name__}: {error}"[:2000])
            continue
          rows.append((name, label, length, fwd, fwd_bytes / (fwd * 1e-3) / 1e9,
                       fwd / (fwd_bytes / bandwidth * 1e3), fwd_bwd,
                       fwd_bwd / (fwd_bwd_bytes / bandwidth * 1e3), fwd_device, fwd_bwd_device))
          print("  ".join(map(str, rows[-1])), flush=True)
          if args.check:
            print_check(name, label, small, check(workload, impl, small))

  width = max([13] + [len(row[1]) + 1 for row in rows])
  device = lambda ms: "-" if ms is None else f"{ms:.3f}"  # noqa: E731
  print(f"\n{'workload':<17}{'impl':<{width}}{'length':>7}{'fwd ms':>9}{'GB/s':>7}{'x floor':>8}"
        f"{'fwd+bwd ms':>11}{'x floor':>8}{'fwd dev':>9}{'f+b dev':>9}")
  for name, impl, length, fwd, gbs, fwd_ratio, fwd_bwd, fwd_bwd_ratio, fwd_dev, fwd_bwd_dev in rows:
    print(f"{name:<17}{impl:<{width}}{length:>7}{fwd:>9.3f}{gbs:>7.0f}{fwd_ratio:>8.1f}"
          f"{fwd_bwd:>11.3f}{fwd_bwd_ratio:>8.1f}{device(fwd_dev):>9}{device(fwd_bwd_dev):>9}")


if __name__ == "__main__":
  main()
