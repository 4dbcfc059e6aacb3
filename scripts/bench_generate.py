"""Decode throughput and per-token latency of our generator: Mamba against GPT (Transformer++), and
RetNet and DenseRetNet, over batch size and prompt length, with the memory each needs.

  python scripts/bench_generate.py --out_dir docs [--time_budget SECONDS] [--check] [--profile DIR]
  python scripts/bench_generate.py --quick --out_dir /tmp/bench   # tiny models, a CPU smoke test

Models (random-init weights, bf16 compute: decoding's speed does not depend on the weights'
values): mamba 130m / 370m, gpt 125m / 350m (configs/gpt.py, our Transformer++), retnet 1.3b and
dense_retnet 350m (the smallest paper sizes). Every number comes from seqmodels/generate.py's
Generator, the code scripts/generate.py runs, decoding greedily with no stop token:

- decode: the compiled decoding loop (Generator.decode) for --new_tokens positions, from a cache at
  prompt position P filled with random values (a step's work does not depend on them). Tokens/s
  is batch x new tokens over the median of --repeats runs; per-token latency is that median over
  new tokens. Compilation is excluded.
- end to end, at batch 64 and prompt 2048: Generator.generate on random prompts, prefill included.
- memory: XLA's allocation for the compiled decode call (arguments, outputs and temporaries), the
  weights and cache included. The largest batch that fits in 80 GB at prompt 2048 is computed from
  it: it grows linearly with batch, so two measured batches give the line.

A model's decoding loops (one per batch size for a recurrent model, one per batch and prompt for
attention) compile first, --compile_threads at once. Points then run in order of importance within
--time_budget (the paper's comparison first, then latency against prompt length, end to end, then
the batch sweep), each model within its share of the budget; what did not fit is listed as
skipped. Points whose cache alone would not fit in memory are skipped as "oom (estimated)", a run
that fails to allocate as "oom".

--check first compares each Mamba model's fused decoding step (kernels/selective_scan_step.py, what
--scan_impl auto and pallas run on a GPU) with XLA's ops on a random state. --steps_per_check sets
how many steps the loop runs between its checks for the end (Generator's; --new_tokens must be a
multiple). --profile DIR traces 8 decoding steps (whole blocks: 16) of every decode point
with jax.profiler into DIR/<model>_b<batch>_p<prompt>/ and prints the device time and kernels per
step and the costliest ops (seqmodels/profiling.py); it writes every device op of those steps in
time order to ops.tsv there, to read a step kernel by kernel.
--scan_impl reference decodes Mamba with XLA's ops instead of that kernel. Writes
bench_generate.json, generation_table.md and two plots, generate_throughput.png (tokens/s against
batch at prompt 2048) and generate_latency.png (per-token latency against prompt length at batch
64), to --out_dir; --report_from FILE rewrites them from a bench_generate.json without measuring.
--merge_into FILE adds this run's points to an earlier run's bench_generate.json (read before
measuring): a point measured again (same model, kind, batch and prompt) replaces the earlier one,
and the report lists both commands. It fills in a grid over several device calls.
Results and the command that made them: docs/generation.md.
"""

import argparse
import concurrent.futures
import gc
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from seqmodels import config as config_lib  # noqa: E402
from flax import nnx  # noqa: E402

import kernels  # noqa: E402
from seqmodels import generate, layers, lm, profiling  # noqa: E402

# name: (config file, variant, share of the time budget)
MODELS = {
    "mamba-370m": ("mamba", "370m", 0.22),
    "gpt-350m": ("gpt", "350m", 0.22),
    "mamba-130m": ("mamba", "130m", 0.12),
    "gpt-125m": ("gpt", "125m", 0.12),
    "retnet-1.3b": ("retnet", "1.3b", 0.16),
    "dense_retnet-350m": ("dense_retnet", "350m", 0.16),
}
CAPACITY = 80e9  # The "80 GB".
TARGET = (64, 2048)  # Batch and prompt length of the Mamba paper's comparison.


def model_config(name: str, quick: bool, scan_impl: str = "auto"):
  arch, variant, _ = MODELS[name]
  cfg = config_lib.load(os.path.join(REPO, "configs", f"{arch}.py") + ":" + ("tiny" if quick else variant)).model
  cfg.dtype = "bfloat16"
  if cfg.architecture == "mamba":
    cfg.scan_impl = scan_impl
  return cfg


def cache_shape(generator, batch: int, prompt: int, new_tokens: int):
  return jax.eval_shape(lambda: generator.init_cache(batch, generator.round_up(prompt + new_tokens)))


def random_state(generator, batch: int, prompt: int, new_tokens: int, cfg, key):
  """The decoding loop's state at position `prompt`, its cache filled with random values."""
  vocab = cfg.vocab_size
  leaves, treedef = jax.tree.flatten(cache_shape(generator, batch, prompt, new_tokens))
  keys = jax.random.split(key, len(leaves) + 2)
  # The positions are the only scalars of a cache.
  leaves = [jnp.full(x.shape, prompt, x.dtype) if x.ndim == 0 else jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys)]
  lengths = jnp.full((batch,), prompt, jnp.int32)
  return generate.DecodeState(
      cache=jax.tree.unflatten(treedef, leaves),
      logits=jax.random.normal(keys[-1], (batch, layers.pad_vocab(vocab, cfg.pad_vocab_multiple)), jnp.float32),
      tokens=jax.random.randint(keys[-2], (batch, generator.round_up(new_tokens)), 0, vocab, jnp.int32),
      offset=jnp.int32(prompt), prompt_lengths=lengths, ends=lengths + new_tokens,
      keys=jax.random.split(key, batch), position=jnp.int32(prompt), done=jnp.zeros(batch, bool))


def check_fused_step(block, batch, seed=0):
  """‖fused - XLA‖ / ‖XLA‖ for one decoding step of a Mamba block from a random state: what it adds
  to the residual stream and its new SSM and conv states, the fused step (kernels/selective_scan_step.py,
  and at 64 rows decode_matmul's conv_product and add_product) against XLA's ops (scan_impl
  "reference")."""
  mixer = block.mixer
  keys = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.normal(keys[0], (batch, 1, mixer.in_proj.in_features), jnp.float32)
  cache = {**mixer.init_cache(batch),
           "conv": jax.random.normal(keys[1], (batch, mixer.d_conv - 1, mixer.d_inner), mixer.dtype),
           "ssm": jax.random.normal(keys[2], (batch, mixer.d_inner, mixer.d_state), jnp.float32)}
  outs = {}
  for impl in ("pallas", "reference"):
    variant = nnx.clone(block)
    variant.mixer.scan_impl = impl
    graphdef, params = nnx.split(variant)
    outs[impl] = jax.jit(lambda params, u, cache: nnx.merge(graphdef, params)(u, cache))(params, u, cache)

  def relative(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  (out, state), (out_ref, state_ref) = outs["pallas"], outs["reference"]
  return {"output": relative(out - u, out_ref - u), "ssm_state": relative(state["ssm"], state_ref["ssm"]),
          "conv_state": relative(state["conv"], state_ref["conv"])}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Bench:

  def __init__(self, args):
    self.args = args
    self.results = []
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def record(self, **row):
    self.results.append(row)
    print(json.dumps(row), flush=True)
    self.save()

  def save(self):
    with open(os.path.join(self.args.out_dir, "bench_generate.json"), "w") as f:
      json.dump({"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "args": vars(self.args), "results": self.results}, f, indent=1)

  def fits(self, generator, weights, batch, prompt):
    return weights + nbytes(cache_shape(generator, batch, prompt, self.args.new_tokens)) <= CAPACITY

  def compile_decode(self, generator, cfg, batch, prompt):
    """(the decoding loop compiled for (batch, prompt), seconds it took)."""
    t0 = time.perf_counter()
    state = jax.eval_shape(lambda: random_state(generator, batch, prompt, self.args.new_tokens, cfg,
                                                jax.random.key(0)))
    (loop, steps), = generator.loops(self.args.new_tokens)
    compiled = loop.lower(generator.params, state, jnp.int32(steps)).compile()
    return compiled, time.perf_counter() - t0

  def decode_point(self, name, generator, cfg, weights, batch, prompt, compiling):
    """Times the decoding loop at (batch, prompt), compiled by `compiling` (a finished future);
    returns the seconds it took."""
    t0 = time.perf_counter()
    new = self.args.new_tokens
    cache_bytes = nbytes(cache_shape(generator, batch, prompt, new))
    if not self.fits(generator, weights, batch, prompt):
      self.record(model=name, kind="decode", batch=batch, prompt=prompt, status="oom (estimated)",
                  cache_bytes=cache_bytes)
      return 0.0
    try:
      compiled, compile_s = compiling.result()
      memory = compiled.memory_analysis()
      n_steps = jnp.int32(new)
      times = []
      for repeat in range(self.args.repeats + 1):
        # The last run's output is freed before the next input is made: gpt-350m's cache at batch 64,
        # prompt 8192 (52 GB) fits once in 80 GB, not twice.
        state = None
        state = random_state(generator, batch, prompt, new, cfg, jax.random.key(repeat))
        jax.block_until_ready(state)
        t = time.perf_counter()
        state = compiled(generator.params, state, n_steps)
        jax.block_until_ready(state)
        if repeat:  # The first run warms up.
          times.append(time.perf_counter() - t)
      assert int(state.position) == prompt + new
      del state
      profile = self.profile(name, generator, cfg, compiled, batch, prompt) if self.args.profile else None
    except Exception as e:  # XLA reports allocation failures as several exception types.
      if not is_oom(e):
        raise
      self.record(model=name, kind="decode", batch=batch, prompt=prompt, status="oom")
      return time.perf_counter() - t0
    seconds = statistics.median(times)
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - \
        memory.alias_size_in_bytes
    self.record(model=name, kind="decode", batch=batch, prompt=prompt, status="ok", new_tokens=new,
                tokens_per_s=batch * new / seconds, ms_per_token=1e3 * seconds / new, seconds=seconds,
                times=times, peak_bytes=peak, cache_bytes=cache_bytes, weights_bytes=weights, compile_s=compile_s,
                **({"profile": profile} if profile else {}))
    return time.perf_counter() - t0

  def profile(self, name, generator, cfg, compiled, batch, prompt):
    """Traces 8 decoding steps, or the whole blocks of --steps_per_check that hold them, and prints
    their device ops per step (seqmodels/profiling.py)."""
    check = generator.steps_per_check
    steps = check * -(-8 // check) if self.args.new_tokens >= check else 8  # whole blocks
    state = random_state(generator, batch, prompt, self.args.new_tokens, cfg, jax.random.key(99))
    jax.block_until_ready(state)
    directory = os.path.join(self.args.profile, f"{name}_b{batch}_p{prompt}")
    summary = profiling.trace(lambda: jax.block_until_ready(compiled(generator.params, state, jnp.int32(steps))),
                              directory, hlo_text=compiled.as_text(), steps=steps)
    print(f"{name} batch {batch} prompt {prompt}, per decoding step:\n{profiling.format_summary(summary, 'token')}",
          flush=True)
    return summary

  def check(self, name, model):
    """Compares a Mamba model's fused decoding step with XLA's ops. Where the kernel fails, or is
    further from XLA's ops than bf16 rounding explains, the model decodes with XLA's ops instead
    (recorded in the check's status), so that the run still measures it."""
    batch = self.args.target[0]
    try:
      errors = check_fused_step(generate.inference_model(model).backbone.blocks[0], batch)
      close = errors["output"] < 2e-2 and errors["ssm_state"] < 1e-2 and errors["conv_state"] < 1e-2
      status = "ok" if close else "too far from XLA's ops"
    except Exception as e:  # A kernel that does not compile on this device.
      errors, status = {}, f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    print(f"{name}: fused decoding step against XLA's: {status}; relative error " +
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    self.record(model=name, kind="check", batch=batch, prompt=None, status=status, **errors)
    if status != "ok":
      print(f"{name}: decoding with XLA's ops (scan_impl reference) instead", flush=True)
      for block in model.backbone.blocks:
        block.mixer.scan_impl = "reference"

  def shapes(self, generator, batch, prompt):
    """What decides the decoding loop's compiled program: the cache's shapes."""
    return batch, str(jax.tree.map(lambda x: x.shape, cache_shape(generator, batch, prompt, self.args.new_tokens)))

  def end_to_end_point(self, name, generator, cfg, batch, prompt):
    t0 = time.perf_counter()
    new = self.args.new_tokens
    prompts = jax.random.randint(jax.random.key(7), (batch, prompt), 0, cfg.vocab_size).tolist()
    times = []
    try:
      for repeat in range(self.args.repeats + 1):
        t = time.perf_counter()
        out = generator.generate(prompts, new)
        if repeat:
          times.append(time.perf_counter() - t)
      assert all(len(row) == new for row in out)
    except Exception as e:
      if not is_oom(e):
        raise
      self.record(model=name, kind="end_to_end", batch=batch, prompt=prompt, status="oom")
      return time.perf_counter() - t0
    seconds = statistics.median(times)
    self.record(model=name, kind="end_to_end", batch=batch, prompt=prompt, status="ok", new_tokens=new,
                tokens_per_s=batch * new / seconds, seconds=seconds, times=times)
    return time.perf_counter() - t0

  def run_model(self, name, deadline):
    cfg = model_config(name, self.args.quick, self.args.scan_impl)
    model = lm.build(cfg)
    if self.args.check and cfg.architecture == "mamba":
      self.check(name, model)
    generator = generate.Generator(model, vocab_size=cfg.vocab_size, length_multiple=self.args.length_multiple,
                                   prefill_tokens=self.args.prefill_tokens, steps_per_check=self.args.steps_per_check)
    del model
    weights = nbytes(generator.params)
    target_batch, target_prompt = self.args.target
    points = [("decode", target_batch, target_prompt)]
    points += [("decode", target_batch, p) for p in self.args.prompts if p != target_prompt]
    if name in self.args.end_to_end:
      points.append(("end_to_end", target_batch, target_prompt))
    points += [("decode", b, target_prompt) for b in self.args.batches if b != target_batch]
    # Every decoding loop this model needs compiles first, at once, in threads (XLA compiles
    # without the GIL): the compiles then take about the slowest one's time, not their sum, and no
    # compile's autotuning runs on the GPU while a point is timed. A recurrent model's loop is one
    # program at every prompt length, so it compiles once per batch size.
    t0 = time.perf_counter()
    compiles = {}
    in_budget = t0 < self.start + self.args.time_budget  # Else every point is skipped.
    with concurrent.futures.ThreadPoolExecutor(self.args.compile_threads) as pool:
      for kind, batch, prompt in points:
        key = self.shapes(generator, batch, prompt)
        if in_budget and kind == "decode" and key not in compiles and self.fits(generator, weights, batch, prompt):
          compiles[key] = pool.submit(self.compile_decode, generator, cfg, batch, prompt)
    print(f"[{self.elapsed():.0f}s] compiled {len(compiles)} decoding loops in {time.perf_counter() - t0:.0f} s",
          flush=True)
    first_cost = None
    for kind, batch, prompt in points:
      # The first point (the paper's comparison) runs whenever the whole budget allows; the others
      # must fit in this model's share, judged by what the first one's runs cost.
      limit = self.start + self.args.time_budget if first_cost is None else deadline
      if time.perf_counter() + (first_cost or 0.0) > limit:
        self.record(model=name, kind=kind, batch=batch, prompt=prompt, status="skipped (time budget)")
        continue
      if kind == "decode":
        cost = self.decode_point(name, generator, cfg, weights, batch, prompt,
                                 compiles.get(self.shapes(generator, batch, prompt)))
      else:
        cost = self.end_to_end_point(name, generator, cfg, batch, prompt)
      first_cost = cost if first_cost is None else first_cost
    del generator, compiles
    gc.collect()
    jax.clear_caches()

  def run(self):
    shares = [MODELS[name][2] for name in self.args.models]
    done = 0.0
    for name, share in zip(self.args.models, shares):
      done += share / sum(shares)
      print(f"[{self.elapsed():.0f}s] {name}", flush=True)
      self.run_model(name, self.start + done * self.args.time_budget)
    self.save()


def weights_bytes(name: str) -> int:
  """Bytes of a model's decoding weights (Generator.params), computed from shapes alone."""
  cfg = model_config(name, quick=False)
  return nbytes(jax.eval_shape(lambda: nnx.state(generate.inference_model(lm.build(cfg)))))


def largest_batches(results, prompt):
  """{model: largest batch in CAPACITY and how it was found} from measured decode memory at `prompt`.

  Memory is linear in batch: with two measured batches the line through them, with one the line
  through it and the weights (which charges the batch-independent temporaries to the sequences,
  so it errs low).
  """
  out = {}
  for name in dict.fromkeys(r["model"] for r in results):
    measured = sorted((r["batch"], r["peak_bytes"], r.get("weights_bytes")) for r in results
                      if r["model"] == name and r["kind"] == "decode" and r["prompt"] == prompt and r["status"] == "ok")
    if len(measured) >= 2:
      (b1, m1, _), (b2, m2, _) = measured[-2:]
      basis = f"batches {b1} and {b2}"
    elif measured:
      (b2, m2, weights), (b1, m1) = measured[0], (0, None)
      m1 = weights if weights is not None else weights_bytes(name)
      basis = f"batch {b2} and the weights"
    else:
      continue
    per_sequence = (m2 - m1) / (b2 - b1)
    fixed = m2 - b2 * per_sequence
    out[name] = {"largest_batch": int((CAPACITY - fixed) // per_sequence), "bytes_per_sequence": per_sequence,
                 "fixed_bytes": fixed, "from": basis}
  return out


def load_results(path):
  """A bench_generate.json, with its commands as a list."""
  if not os.path.isfile(path):
    raise SystemExit(f"error: {path} does not exist; pass the bench_generate.json an earlier run wrote")
  data = json.load(open(path))
  if "command" in data:  # Files from before several runs could be merged held one command.
    data["commands"] = [data.pop("command")]
  # A file from before commands were recorded in it: the run that wrote docs/ used these flags.
  data.setdefault("commands", [f"python scripts/bench_generate.py --out_dir docs --time_budget "
                               f"{data['args']['time_budget']:g} --repeats {data['args']['repeats']}"])
  return data


def point_key(row):
  return row["model"], row["kind"], row["batch"], row["prompt"]


def check_mergeable(earlier, args):
  """Refuses to merge runs whose points mean different things: another device, target or length."""
  ours = {"device": str(jax.devices()[0].device_kind), "target": args.target, "new_tokens": args.new_tokens}
  theirs = {"device": earlier["device"], "target": earlier["args"]["target"],
            "new_tokens": earlier["args"]["new_tokens"]}
  differing = [k for k in ours if ours[k] != theirs[k]]
  if differing:
    raise SystemExit(f"error: --merge_into {args.merge_into} was measured with other "
                     + ", ".join(f"{k} ({theirs[k]} against {ours[k]})" for k in differing)
                     + "; measure with the same settings or write to a new --out_dir without --merge_into")


def merge(earlier, later):
  """earlier's results with later's points in place of the same points, and later's new points after."""
  replacing = {point_key(r): r for r in later["results"]}
  results = [replacing.pop(point_key(r), r) for r in earlier["results"]]
  return {**later, "results": results + list(replacing.values()),
          "commands": earlier["commands"] + later["commands"]}


def write_report(path, data, commands):
  results = data["results"]
  ok = [r for r in results if r["status"] == "ok"]
  target_batch, target_prompt = data["args"]["target"]
  if len(commands) == 1:
    lines = [f"Device: {data['device']} ({data['backend']}). Command: `{commands[0]}`", ""]
  else:
    lines = [f"Device: {data['device']} ({data['backend']}). Commands, each later one's points replacing the same "
             "earlier points: " + "; then ".join(f"`{c}`" for c in commands), ""]
  lines += ["| model | batch | prompt | decode tokens/s | ms / token | peak memory (GB) |", "|---|---|---|---|---|---|"]
  for r in results:
    if r["kind"] != "decode":
      continue
    if r["status"] != "ok":
      lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['status']} | | |")
      continue
    lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['tokens_per_s']:,.0f} | {r['ms_per_token']:.2f} "
                 f"| {r['peak_bytes'] / 1e9:.1f} |")
  e2e = [r for r in ok if r["kind"] == "end_to_end"]
  if e2e:
    lines += ["", f"End to end (prefill + {data['args']['new_tokens']} new tokens):", "",
              "| model | batch | prompt | tokens/s | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['tokens_per_s']:,.0f} | {r['seconds']:.3f} |" for r in e2e]

  def find(model, kind, batch, prompt):
    return next((r for r in ok if (r["model"], r["kind"], r["batch"], r["prompt"]) == (model, kind, batch, prompt)), None)

  lines += ["", "Targets:", ""]
  for kind in ("decode", "end_to_end"):
    mamba, gpt = find("mamba-370m", kind, target_batch, target_prompt), find("gpt-350m", kind, target_batch, target_prompt)
    if mamba and gpt:
      ratio = mamba["tokens_per_s"] / gpt["tokens_per_s"]
      lines.append(f"- {kind.replace('_', ' ')} at batch {target_batch}, prompt {target_prompt}: mamba-370m / gpt-350m "
                   f"= {ratio:.2f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
  for name in (m for m in dict.fromkeys(r["model"] for r in results) if m.startswith("mamba")):
    prompts = sorted(r["prompt"] for r in ok if r["model"] == name and r["kind"] == "decode"
                     and r["batch"] == target_batch)
    if len(prompts) < 2:
      lines.append(f"- {name} per-token latency against prompt length: not measured")
      continue
    lo, hi = (find(name, "decode", target_batch, p)["ms_per_token"] for p in (prompts[0], prompts[-1]))
    change = hi / lo - 1
    lines.append(f"- {name} per-token latency at batch {target_batch}, prompt {prompts[0]} -> {prompts[-1]}: "
                 f"{lo:.3f} -> {hi:.3f} ms ({change:+.1%}; target within 10%: {'met' if abs(change) <= 0.1 else 'NOT met'})")
  for r in (r for r in results if r["kind"] == "check"):
    errors = (f", relative error: output {r['output']:.1e}, SSM state {r['ssm_state']:.1e}, conv state "
              f"{r['conv_state']:.1e}") if "output" in r else ""
    fallback = "" if r["status"] == "ok" else "; decoded with XLA's ops instead"
    lines.append(f"- {r['model']} fused decoding step against XLA's ops, batch {r['batch']}: {r['status']}{errors}"
                 f"{fallback}")
  largest = data.get("largest_batch", {})
  if largest:
    lines += ["", f"Largest batch in {CAPACITY / 1e9:.0f} GB at prompt {target_prompt} (+{data['args']['new_tokens']} "
              "new tokens), computed from the measured decode memory, linear in batch:", "",
              "| model | largest batch | MB per sequence | from the memory at |", "|---|---|---|---|"]
    lines += [f"| {m} | {v['largest_batch']:,} | {v['bytes_per_sequence'] / 1e6:.2f} | {v['from']} |"
              for m, v in largest.items()]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def plot(out_dir, data):
  import matplotlib  # Only on the machines that plot: it is not a dependency of the package.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in data["results"] if r["status"] == "ok" and r["kind"] == "decode"]
  target_batch, target_prompt = data["args"]["target"]
  for file, x_key, fixed_key, fixed, y_key, y_label, log_y in (
      ("generate_throughput.png", "batch", "prompt", target_prompt, "tokens_per_s", "decode tokens/s", True),
      ("generate_latency.png", "prompt", "batch", target_batch, "ms_per_token", "ms per token", False)):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in ok):
      points = sorted((r[x_key], r[y_key]) for r in ok if r["model"] == name and r[fixed_key] == fixed)
      if points:
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    if log_y:
      ax.set_yscale("log")
    ax.set_xlabel("batch size" if x_key == "batch" else "prompt length (decode position)")
    ax.set_ylabel(y_label)
    ax.set_title(f"{y_label} at {fixed_key} {fixed}, {data['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, file), dpi=120)
    plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batches", default="1,16,64,256")
  parser.add_argument("--prompts", default="512,2048,8192")
  parser.add_argument("--target", default="64,2048", help="batch,prompt of the comparison and the sweeps' fixed value")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps_per_check", type=int, default=16,
                      help="Generator's steps_per_check: decoding steps between the loop's checks for its end")
  parser.add_argument("--end_to_end", default="mamba-370m,gpt-350m", help="models also timed with prefill")
  parser.add_argument("--time_budget", type=float, default=3600.0, help="seconds for all points")
  parser.add_argument("--length_multiple", type=int, default=64)
  parser.add_argument("--prefill_tokens", type=int, default=16384)
  parser.add_argument("--out_dir", default="docs")
  parser.add_argument("--scan_impl", default="auto", help="model.scan_impl of the Mamba models; auto and pallas decode "
                      "with the fused step kernel on a GPU, reference with XLA's ops")
  parser.add_argument("--check", action="store_true", help="first compare each Mamba model's fused decoding step "
                      "with XLA's ops on a random state (printed and recorded as kind 'check')")
  parser.add_argument("--compile_threads", type=int, default=8, help="decoding loops compiled at once")
  parser.add_argument("--profile", default="", help="trace 8 decoding steps of each decode point into this folder "
                      "and print the device ops and kernels per step")
  parser.add_argument("--set", nargs="*", default=[],
                      help="kernel tuning constants, e.g. selective_scan_step.TRITON_WARPS=8")
  parser.add_argument("--no_plots", action="store_true")
  parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test for a CPU")
  parser.add_argument("--report_from", help="a bench_generate.json: rewrite its table (and plots) without measuring")
  parser.add_argument("--merge_into", help="an earlier run's bench_generate.json: this run's points replace its "
                      "points of the same model, kind, batch and prompt, and add to the rest")
  args = parser.parse_args(argv)
  if args.quick:  # Sizes for a CPU, where not given on the command line.
    quick = {"batches": "1,4,8", "prompts": "16,64", "target": "4,64", "new_tokens": 8, "repeats": 1}
    for name, value in quick.items():
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
  args.models = [m for m in args.models.split(",") if m]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown:
    parser.error(f"unknown --models {unknown}; known: {', '.join(MODELS)}")
  args.batches = [int(b) for b in args.batches.split(",")]
  args.prompts = [int(p) for p in args.prompts.split(",")]
  args.target = [int(x) for x in args.target.split(",")]
  args.end_to_end = [m for m in args.end_to_end.split(",") if m]
  if args.steps_per_check < 1:
    parser.error(f"--steps_per_check must be at least 1, got {args.steps_per_check}")
  if args.new_tokens > args.steps_per_check and args.new_tokens % args.steps_per_check:
    parser.error(f"--new_tokens {args.new_tokens} must be a multiple of --steps_per_check {args.steps_per_check} "
                 "(or at most it), so that each timed run is one compiled loop")
  os.makedirs(args.out_dir, exist_ok=True)
  kernels.set_tuning(args.set)

  # Compiled programs go to a disk cache, so that a shape timed by the decode loop and again end to
  # end compiles once.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench_generate_jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if args.report_from:
    data = load_results(args.report_from)
  else:
    earlier = load_results(args.merge_into) if args.merge_into else None
    if earlier:
      check_mergeable(earlier, args)
    bench = Bench(args)
    bench.run()
    data = json.load(open(os.path.join(args.out_dir, "bench_generate.json")))
    command = "python scripts/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data["commands"] = [command.strip()]
    if earlier:
      data = merge(earlier, data)
  data["largest_batch"] = largest_batches(data["results"], data["args"]["target"][1])
  with open(os.path.join(args.out_dir, "bench_generate.json"), "w") as f:
    json.dump(data, f, indent=1)
  print(write_report(os.path.join(args.out_dir, "generation_table.md"), data, data["commands"]))
  if not args.no_plots:
    plot(args.out_dir, data)
  print(f"wrote {args.out_dir}")


if __name__ == "__main__":
  main()
