"""Device-op summaries of jax.profiler traces, for the benchmark scripts' --profile.

    summary = profiling.trace(lambda: run_steps(3), directory, hlo_text=compiled.as_text(), steps=3)
    print(profiling.format_summary(summary))

`trace` runs a function under jax.profiler, reads the Perfetto trace it writes and returns the
device time per step by category (matmul, attention, scan, other), the costliest ops, and the
number of device kernels per step, and writes every device op in time order to ops.tsv.
Categories come from the kernel names and from the jax name stacks that the compiled HLO attaches
to each op (`scan`: the scan core's Mosaic GPU kernels, and ops under a "scan" named scope).

XLA:GPU runs its command buffers (CUDA graphs) op by op while a profile is active, so a trace
shows every kernel, but its times include the launch gaps that graphs would hide.
"""

import glob
import gzip
import json
import os
import re
import statistics
import time

import jax

MATMUL_KERNELS = re.compile(r"gemm|xmma|cublas|cutlass|nvjet|wgmma|matmul|dot", re.I)
ATTENTION_KERNELS = re.compile(r"cudnn|fmha|flash|attention", re.I)
# Pallas kernels carry no HLO op, so no scope, in a GPU trace; every Mosaic GPU kernel of ours is
# the scan core's (kernels/), named after its body.
SCAN_KERNELS = re.compile(r"mosaic_gpu_kernel")
COPIES = re.compile(r"memcpy|memset", re.I)


def median_wall_ms(call, arg_sets, repeats, synchronize):
  """Median wall time in ms of call(args), cycling through arg_sets, each call followed by
  synchronize(its result), after one warm-up call per set: how the benchmark scripts time our jax
  functions (synchronize = jax.block_until_ready) and the torch peers alike."""
  for args in arg_sets:
    synchronize(call(args))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    synchronize(call(arg_sets[i % len(arg_sets)]))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def trace(run, directory, *, hlo_text, steps):
  """Traces run() (which must block until its device work is done) into directory; returns the
  summary of its device ops per step, or {"error": ...} when no trace was written."""
  os.makedirs(directory, exist_ok=True)
  with gzip.open(os.path.join(directory, "hlo.txt.gz"), "wt") as f:
    f.write(hlo_text)
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  try:
    run()
  finally:
    jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True),
                  key=os.path.getmtime)
  if not traces:
    return {"error": "no perfetto trace written"}
  ops = device_ops(traces[-1], hlo_text)
  write_timeline(ops, os.path.join(directory, "ops.tsv"))
  return summarize(ops, steps)


def hlo_instructions(hlo_text):
  """(computation, whether it is the entry, instruction name, the text after its ' = ') for every
  instruction of an HLO module's text, in order."""
  computation, entry = None, False
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      computation, entry = header.group(2), bool(header.group(1))
      continue
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if match:
      yield computation, entry, match.group(1), match.group(2)


def op_scopes(hlo_text):
  """HLO instruction name -> the jax name stacks (op_name metadata) of it and of the ops it fuses.

  A fusion's own metadata is its root op's, so the ops inside it are read too. Each name is also
  entered as the GPU kernel is named after it ('.' and '-' become '_').
  """
  computation_ops, instructions = {}, []
  for computation, _, name, text in hlo_instructions(hlo_text):
    op_name = re.search(r'op_name="([^"]*)"', text)
    op_name = op_name.group(1) if op_name else ""
    computation_ops.setdefault(computation, []).append(op_name)
    instructions.append((name, op_name, re.findall(r"calls=%?([\w.\-]+)", text)))
  scopes = {}
  for name, op_name, calls in instructions:
    scope = " ".join([op_name, *(op for called in calls for op in computation_ops.get(called, []))])
    scopes[name] = scopes[re.sub(r"[.\-]", "_", name)] = scope
  return scopes


def categorize(name, scope):
  """attention, matmul (by kernel name), scan (a scan-core kernel, or an op under a "scan" scope), or
  other."""
  if ATTENTION_KERNELS.search(name) or "dot_product_attention" in scope:
    return "attention"
  if MATMUL_KERNELS.search(name):
    return "matmul"
  if SCAN_KERNELS.search(name) or re.search(r"(^|[/(])scan([/)]|$)", scope):
    return "scan"
  return "other"


def device_ops(path, hlo_text):
  """The device ops of a perfetto trace in time order: dicts of start and duration (us), kernel
  name, category and jax name stack."""
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in e["args"]["name"]}
  # A GPU's trace may add lines derived from its kernels ("XLA Modules", "XLA Ops") beside the
  # CUDA streams that ran them; where stream lines are named, only they count.
  streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
             and e.get("pid") in device_pids and re.search(r"stream", e["args"].get("name", ""), re.I)}
  scopes = op_scopes(hlo_text)
  ops = []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids or (streams and (e["pid"], e.get("tid")) not in streams):
      continue
    # Under CUDA graphs hlo_op names the command buffer; the kernel is then named after its fusion.
    scope = scopes.get(e.get("args", {}).get("hlo_op", ""), "") + " " + scopes.get(e["name"], "")
    ops.append({"start": e.get("ts", 0.0), "us": e["dur"], "name": e["name"], "category": categorize(e["name"], scope),
                "scope": " ".join(scope.split())})
  return sorted(ops, key=lambda op: op["start"])


def write_timeline(ops, path):
  """Every device op, one a line in time order (tab-separated), for reading a step kernel by kernel."""
  with open(path, "w") as f:
    f.write("start_us\tus\tcategory\tkernel\tscope\n")
    f.writelines(f"{op['start']:.3f}\t{op['us']:.3f}\t{op['category']}\t{op['name']}\t{op['scope']}\n" for op in ops)


def summarize(ops, steps, top=15):
  """Device op time per step from a trace's device_ops: totals by category, the `top` costliest ops,
  and kernels (device ops other than copies and memsets) per step."""
  by_op, by_category, kernels = {}, {}, 0
  for op in ops:
    key = (op["name"][:80], op["category"])
    by_op.setdefault(key, [0.0, 0, op["scope"][:300]])
    by_op[key][0] += op["us"] / steps / 1e3
    by_op[key][1] += 1
    by_category[op["category"]] = by_category.get(op["category"], 0.0) + op["us"] / steps / 1e3
    kernels += not COPIES.search(op["name"])
  if not by_category:
    return {"error": "the trace holds no device ops (a CPU backend traces host work only)"}
  total = sum(by_category.values())
  ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
  return {"device_ms_per_step": total, "ms_by_category": by_category, "kernels_per_step": kernels / steps,
          "top_ops": [{"name": name, "category": cat, "ms": ms, "count": count / steps, "scope": scope}
                      for (name, cat), (ms, count, scope) in ranked]}


def format_summary(summary, unit="step"):
  if "error" in summary:
    return f"profile: {summary['error']}"
  total = summary["device_ms_per_step"]
  lines = [f"device time {total:.3f} ms/{unit}, {summary['kernels_per_step']:.0f} kernels/{unit}: " + ", ".join(
      f"{cat} {ms:.3f} ms ({ms / total:.0%})" for cat, ms in sorted(summary["ms_by_category"].items(),
                                                                     key=lambda kv: -kv[1]))]
  # The end of an op's jax name stack says which layer code it came from.
  lines += [f"  {op['ms']:8.3f} ms  {op['count']:5.0f} x  {op['category']:<9} {op['name']}  {op['scope'][-90:]}"
            for op in summary["top_ops"]]
  return "\n".join(lines)
