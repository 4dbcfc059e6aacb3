"""Decoding's projections at their exact shapes: kernels/decode_matmul.py against XLA's GEMM
(jnp.dot) and jax's own Mosaic GPU Hopper matmul (jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu).

  python scripts/bench_decode_matmul.py --out /tmp/decode_matmul.json            # defaults side by side
  python scripts/bench_decode_matmul.py --sweep --time_budget 240 --out FILE     # and every tiling

Shapes are the bf16 projections of a decoding step at --batch rows: mamba-370m's in_proj, x_proj and
out_proj, gpt-350m's qkv, attention output, SwiGLU gate/up and down. Every variant is first checked
against a float64 product of fresh random inputs (‖out - ref‖ / ‖ref‖ under 1e-2, bf16 rounding);
a failing one is reported and not timed. Times are device times (CUPTI, the summed durations of the
kernels: the GEMM plus, where there is one, the split-K reduction and the row padding), over
enough distinct weights (>= 128 MB) that each product reads its weight from memory, not the 50 MB
L2, as a decoding step does. Two times per variant:

- alone: the median over --repeats calls, each dispatched by itself, cycling through the weights;
- in a chain: one compiled program runs a product for every weight in turn, each with an x of its
  own, back to back as a decoding step's kernels run; its device time over the number of products,
  the median of --chain_repeats runs.

Back to back a kernel runs slower than alone (on an H100, mamba-370m's in_proj through
decode_matmul: 4.2 us alone, 5.6 in a chain of 48, 6.4 in the decoding loop; kernels/NOTES.md,
Session 13), so the chain is the one to predict decoding with. The bandwidth columns are the
weight's bytes over each time. Needs a Hopper GPU.
"""

import argparse
import concurrent.futures
import functools
import itertools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kernels import decode_matmul  # noqa: E402

# name: (k, n) of x (batch, k) @ w (k, n)
SHAPES = {
    "mamba-370m in_proj": (1024, 4096),
    "mamba-370m x_proj": (2048, 96),
    "mamba-370m out_proj": (2048, 1024),
    "gpt-350m qkv": (1024, 3072),
    "gpt-350m attn out": (1024, 1024),
    "gpt-350m gate/up": (1024, 2816),
    "gpt-350m down": (2816, 1024),
}
WEIGHT_BYTES = 128 << 20  # Per shape, rotated over: more than twice the H100's L2.


def relative_error(out, x, w):
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


def hopper_mgpu(tile_n):
  """jax's Hopper matmul with 64-row tiles: two warpgroups of tile_n columns a block, no split of k.
  Its blocks take 2 tile_n columns, so w is padded to a multiple of that (x_proj's 96). tile_n=32
  fails on the H100 (its 64-column output blocks' swizzle)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hopper

  config = hopper.TuningConfig(tile_m=64, tile_n=tile_n, tile_k=64, max_concurrent_steps=4,
                               epi_tile_m=64, epi_tile_n=min(64, tile_n))

  def run(x, w):
    n = w.shape[1]
    padded = 2 * tile_n * math.ceil(n / (2 * tile_n))
    return hopper.matmul(x, jnp.pad(w, ((0, 0), (0, padded - n))), None, config)[:, :n]
  return run


def variants(k, n, sweep):
  """name -> fn(x, w) for one shape."""
  out = {"xla jnp.dot": jnp.dot, "ours (defaults)": decode_matmul.matmul,
         "jax hopper_matmul_mgpu tile_n=64": hopper_mgpu(64)}
  if not sweep:
    return out
  for tile_n, tile_k, parts in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16)):
    if n % tile_n == 0 and k % (tile_k * parts) == 0:  # Stages: as many as fit, up to STAGES.
      out[f"ours tile_n={tile_n} tile_k={tile_k} parts={parts}"] = functools.partial(
          decode_matmul.matmul, tile_n=tile_n, tile_k=tile_k, parts=parts)
  return out


def median_device_us(fn, arg_sets, repeats, products=1):
  """Median device time (us) per product of fn over repeats calls cycling through arg_sets, after
  one call that warms up; fn runs `products` products a call."""
  from jax.experimental.mosaic.gpu import profiler

  measured = profiler.measure(fn)
  times = [1e3 * measured(*arg_sets[i % len(arg_sets)])[1] / products for i in range(repeats + 1)]
  return statistics.median(times[1:])


def chain_us(fn, xs, weights, repeats):
  """Median device time (us) per product of one program running fn(x, w) for each (x, w) in turn.

  Each product has an x of its own: XLA merges dots that share an operand into one over the
  concatenated weights (copies that a decoding step does not have)."""
  chain = jax.jit(lambda xs, ws: tuple(fn(x, w) for x, w in zip(xs, ws)))
  return median_device_us(chain, [(xs, weights)], repeats, products=len(weights))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
  parser.add_argument("--sweep", action="store_true", help="also every tiling of ours")
  parser.add_argument("--repeats", type=int, default=40, help="calls timed alone")
  parser.add_argument("--chain_repeats", type=int, default=5, help="runs of the chain over every weight")
  parser.add_argument("--time_budget", type=float, default=1e9, help="seconds; shapes past it are skipped")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  start = time.perf_counter()
  results = []
  for shape_name in args.shapes.split(","):
    if time.perf_counter() - start > args.time_budget:
      print(f"{shape_name}: skipped (time budget)", flush=True)
      continue
    k, n = SHAPES[shape_name]
    weight_bytes = 2 * k * n
    count = min(256, math.ceil(WEIGHT_BYTES / weight_bytes))
    keys = jax.random.split(jax.random.key(len(results)), count + 1)
    xs = list(jax.random.normal(keys[0], (count, args.batch, k), jnp.bfloat16))  # one per product of a chain
    x = xs[0]
    weights = [jax.random.normal(key, (k, n), jnp.bfloat16) * k**-0.5 for key in keys[1:]]
    fns = variants(k, n, args.sweep)

    def compile_one(fn):
      return jax.jit(fn).lower(x, weights[0]).compile()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      compiling = {name: pool.submit(compile_one, fn) for name, fn in fns.items()}
      rows = []
      for name, future in compiling.items():
        row = {"shape": shape_name, "batch": args.batch, "k": k, "n": n, "variant": name}
        try:
          compiled = future.result()
          row["error"] = relative_error(compiled(x, weights[1 % count]), x, weights[1 % count])
          row["status"] = "ok" if row["error"] < 1e-2 else "WRONG"
          if row["status"] == "ok":
            row["us"] = median_device_us(compiled, [(x, w) for w in weights], args.repeats)
            row["TB/s"] = weight_bytes / row["us"] / 1e6
            row["chain_us"] = chain_us(fns[name], xs, weights, args.chain_repeats)
            row["chain TB/s"] = weight_bytes / row["chain_us"] / 1e6
        except Exception as e:  # A tiling the kernel or the hardware refuses: reported, not fatal.
          row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    results += rows
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "batch": args.batch, "results": results}, f, indent=1)

  print(f"\nDevice: {jax.devices()[0].device_kind}, batch {args.batch}, device us per product: alone (median of "
        f"{args.repeats} calls) and in a chain over every weight (median of {args.chain_repeats})")
  for shape_name in dict.fromkeys(r["shape"] for r in results):
    rows = [r for r in results if r["shape"] == shape_name]
    timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    xla, xla_chain = next(((r["us"], r["chain_us"]) for r in rows if r["variant"] == "xla jnp.dot" and "us" in r),
                          (float("nan"), float("nan")))
    print(f"{shape_name} (k {rows[0]['k']}, n {rows[0]['n']}, {2 * rows[0]['k'] * rows[0]['n'] / 1e6:.1f} MB):")
    shown = [r for r in timed if not r["variant"].startswith("ours tile")][:6] + [
        r for r in timed if r["variant"].startswith("ours tile")][:3]
    for r in sorted(shown, key=lambda r: r["us"]):
      print(f"  alone {r['us']:7.2f} us  {r['TB/s']:5.2f} TB/s  x{xla / r['us']:4.2f} vs xla   in a chain "
            f"{r['chain_us']:7.2f} us  {r['chain TB/s']:5.2f} TB/s  x{xla_chain / r['chain_us']:4.2f} vs xla  {r['variant']}")
    for r in rows:
      if r["status"] != "ok":
        print(f"  {r['status'][:120]}  {r['variant']}")


if __name__ == "__main__":
  main()
