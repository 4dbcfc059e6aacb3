"""Generation: greedy decoding against full forward passes, batching, sampling, and the CLI."""

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from kernels import selective_scan_step
from seqmodels import generate, lm, trainer
from seqmodels.errors import UserError

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_generate  # noqa: E402  scripts/bench_generate.py
import generate as generate_cli  # noqa: E402  scripts/generate.py

CAUSAL = [name for name, backbone in lm.ARCHITECTURES.items() if not getattr(backbone, "bidirectional", False)]
HF_FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf_mamba_tiny", "hf")
PROMPTS = [[5, 17, 99, 3, 250], [42, 7], [200, 1, 64]]


def spread_model(arch, seed=1):
  """A tiny model with its matrices scaled up: at the default init, greedy decoding of a random
  model repeats one token, which would make comparisons between decoders weak."""
  cfg = tiny_config(arch).model
  model = lm.build(cfg, seed=seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params))
  return model, cfg


def argmax_of_full_forward(model, prompts, n, vocab_size, length=32):
  """Greedy decoding by the training forward pass over each whole sequence, once per new token.

  The sequences are padded to `length` (one compiled shape, one batch) and each is read at its last
  real token, which the padding after it cannot change in a causal model.
  """
  forward = nnx.jit(lambda model, tokens: model(tokens))
  sequences = [list(p) for p in prompts]
  for _ in range(n):
    padded = jnp.asarray([s + [0] * (length - len(s)) for s in sequences])
    logits = forward(model, padded)
    for row, s in enumerate(sequences):
      s.append(int(jnp.argmax(logits[row, len(s) - 1, :vocab_size])))
  return [s[len(p):] for s, p in zip(sequences, prompts)]


def test_inference_model_stores_weights_in_the_compute_dtype_and_leaves_the_model_alone():
  """A bf16 decoding step must read bf16 weights: float32 ones are converted at every step (on an
  H100 that took mamba-370m from 1.55 to 2.3 ms a token)."""
  model = lm.build(tiny_config("mamba", **{"model.dtype": "bfloat16"}).model, seed=0)
  inference = generate.inference_model(model)
  dtypes = lambda m: {str(getattr(module, name)[...].dtype) for _, module in nnx.iter_modules(m)  # noqa: E731
                      for name in ("kernel", "embedding") if isinstance(module, (nnx.Linear, nnx.Embed))
                      and hasattr(module, name)}
  assert dtypes(inference) == {"bfloat16"} and dtypes(model) == {"float32"}
  tokens = jnp.asarray([[3, 17, 5]], jnp.int32)
  np.testing.assert_allclose(inference(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("arch", CAUSAL)
def test_greedy_batch_of_mixed_lengths_equals_argmax_of_full_forward(arch):
  model, cfg = spread_model(arch)
  generator = generate.Generator(model, vocab_size=cfg.vocab_size, steps_per_check=2)
  # 9 positions past the shortest prompt: 4 blocks of 2 steps, then 1 step checked alone.
  assert [steps for _, steps in generator.loops(9)] == [8, 1]
  out = generator.generate(PROMPTS, max_new_tokens=6)
  expected = argmax_of_full_forward(model, PROMPTS, 6, cfg.vocab_size)
  assert out == expected
  assert len({t for row in out for t in row}) > 4  # The outputs vary, so the comparison can fail.


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])
def test_sampled_batch_equals_each_prompt_alone(arch):
  model, cfg = spread_model(arch, seed=3)
  generator = generate.Generator(model, vocab_size=cfg.vocab_size, steps_per_check=4,
                                 sampling=generate.Sampling(temperature=1.0, top_k=50, top_p=0.9))
  batched = generator.generate(PROMPTS, max_new_tokens=7, seed=11)  # Blocks of 4, then 2 steps.
  alone = [generator.generate([p], max_new_tokens=7, seed=11, indices=[i])[0] for i, p in enumerate(PROMPTS)]
  assert batched == alone
  assert generator.generate(PROMPTS, max_new_tokens=7, seed=11) == batched
  assert generator.generate(PROMPTS, max_new_tokens=7, seed=12) != batched


def test_chunked_prefill_and_stop_tokens():
  model, cfg = spread_model("gpt")
  prompt = list(range(3, 24))
  whole = generate.Generator(model, vocab_size=cfg.vocab_size).generate([prompt], max_new_tokens=5)[0]
  assert generate.prefill_chunks(21, 8) == [8, 8, 4, 1]
  chunked = generate.Generator(model, vocab_size=cfg.vocab_size, prefill_tokens=8).generate([prompt], 5)[0]
  assert chunked == whole == argmax_of_full_forward(model, [prompt], 5, cfg.vocab_size)[0]
  stopper = generate.Generator(model, vocab_size=cfg.vocab_size, stop_ids=(whole[2],))
  state = stopper.decode(stopper.start([prompt], 5), 5)
  assert stopper.completions(state) == [whole[:whole.index(whole[2])]]
  stop_at = len(prompt) + whole.index(whole[2]) + 1
  assert int(state.position) == stop_at  # The loop ended at the stop token.
  blocks = generate.Generator(model, vocab_size=cfg.vocab_size, stop_ids=(whole[2],), steps_per_check=4)
  state = blocks.decode(blocks.start([prompt], 8), 8)
  assert blocks.completions(state) == [whole[:whole.index(whole[2])]]
  # Checked between blocks: the loop ends with the block that met the stop token.
  assert int(state.position) == len(prompt) + 4 * -(-(stop_at - len(prompt)) // 4)
  with pytest.raises(UserError, match="steps_per_check"):
    generate.Generator(model, vocab_size=cfg.vocab_size, steps_per_check=0)


def _softmax64(logits):
  p = np.exp(logits - logits.max())
  return p / p.sum()


def test_top_k_top_p_and_temperature_shape_the_distribution():
  logits = np.log(np.asarray([0.30, 0.05, 0.20, 0.15, 0.10, 0.12, 0.08, 0.0, 0.0, 0.0]) + 1e-30)
  logits[7:] = 50.0  # Padding of the vocabulary: must never be drawn however likely.
  rows = 20000
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (rows, len(logits)))
  keys = jax.random.split(jax.random.key(0), rows)

  def draw(**kw):
    tokens = generate.sample_tokens(batch, keys, jnp.int32(3), generate.Sampling(**kw), vocab_size=7)
    return np.bincount(np.asarray(tokens), minlength=10) / rows

  freq = draw(temperature=0.5)
  expected = _softmax64(logits[:7].astype(np.float64) / 0.5)
  np.testing.assert_allclose(freq[:7], expected, atol=0.015)
  assert freq[7:].sum() == 0
  top3 = draw(temperature=1.0, top_k=3)
  assert set(np.nonzero(top3)[0]) == {0, 2, 3}
  np.testing.assert_allclose(top3[[0, 2, 3]], np.asarray([0.30, 0.20, 0.15]) / 0.65, atol=0.015)
  # 0.30 + 0.20 + 0.15 = 0.65 < 0.7, so the nucleus needs the fourth most likely token, 0.12.
  nucleus = draw(temperature=1.0, top_p=0.7)
  assert set(np.nonzero(nucleus)[0]) == {0, 2, 3, 5}
  both = draw(temperature=1.0, top_k=2, top_p=0.7)
  assert set(np.nonzero(both)[0]) == {0, 2}
  greedy = draw(temperature=0.0)
  assert greedy[0] == 1.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gen") / "mamba")
  trainer.train(tiny_config("mamba", total_steps=4, checkpoint_every=4), path, progress=False)
  return path


def _cli(capsys, *args):
  code = generate_cli.main(list(args))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_cli_on_a_trained_workdir(workdir, tmp_path, capsys):
  from seqmodels import evaluate
  prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "O"]
  with open(tmp_path / "prompts.jsonl", "w") as f:
    f.write("".join(json.dumps({"prompt": p, "id": i}) + "\n\n" for i, p in enumerate(prompts)))
  out_path = str(tmp_path / "out.jsonl")
  code, _, err = _cli(capsys, "--workdir", workdir, "--prompts_file", str(tmp_path / "prompts.jsonl"),
                      "--output", out_path, "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "2")
  assert code == 0, err
  records = [json.loads(line) for line in open(out_path)]
  assert [r["prompt"] for r in records] == prompts and [r["index"] for r in records] == [0, 1, 2]

  loaded = evaluate.load(workdir)
  tokenizer = evaluate.model_tokenizer(loaded, None)
  references = argmax_of_full_forward(loaded.model, tokenizer.encode_batch(prompts), 12, tokenizer.vocab_size, 64)
  for r, expected in zip(records, references):
    cut = expected.index(tokenizer.eos_id) if tokenizer.eos_id in expected else 12
    assert r["tokens"] == expected[:cut]
    assert r["completion"] == tokenizer.decode(r["tokens"])
    assert r["finish_reason"] == ("eos" if cut < 12 else "length")

  # A stop string cuts the text before it and the tokens after the one completing it.
  stop = records[0]["completion"][3:5]
  code, out, err = _cli(capsys, "--workdir", workdir, "--prompt", "ROMEO:", "--temperature", "0",
                        "--max_new_tokens", "12", "--stop", stop)
  assert code == 0, err
  assert out == records[0]["completion"][:records[0]["completion"].index(stop)] + "\n"


def test_cli_streams_a_sample_from_the_hf_mamba_fixture():
  cmd = [sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--checkpoint", HF_FIXTURE, "--prompt",
         "Hello", "--max_new_tokens", "24", "--temperature", "0.9", "--top_k", "40", "--seed", "5"]
  first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  from seqmodels import evaluate
  from seqmodels.tokenizers import ByteTokenizer
  loaded = evaluate.load_checkpoint(HF_FIXTURE)
  generator = generate.Generator(loaded.model, vocab_size=257, sampling=generate.Sampling(0.9, 40), stop_ids=(256,))
  tokens = generator.generate([list(b"Hello")], 24, seed=5)[0]
  assert first.stdout == ByteTokenizer().decode(tokens) + "\n"


@pytest.mark.parametrize("content, message", [
    (None, "prompts.jsonl not found"),
    ('{"prompt": "a"}\n{"prompt": "b"\n', r"prompts.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n\n["b"]\n', r"prompts.jsonl:3: needs an object with a \"prompt\" string"),
    ('{"prompt": ""}\n', r"prompts.jsonl:1: the prompt is empty"),
    ("\n", "holds no prompts"),
])
def test_cli_rejects_bad_prompt_files_in_one_line(content, message, tmp_path, capsys):
  path = tmp_path / "prompts.jsonl"
  if content is not None:
    path.write_text(content)
  code, _, err = _cli(capsys, "--checkpoint", HF_FIXTURE, "--prompts_file", str(path))
  assert code == 1
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert re.search(message, err)


def test_empty_prompts_bad_sampling_encoders_and_overlong_requests_are_refused(capsys):
  code, _, err = _cli(capsys, "--checkpoint", HF_FIXTURE, "--prompt", "")
  assert code == 1 and "--prompt is empty" in err
  code, _, err = _cli(capsys, "--checkpoint", HF_FIXTURE, "--prompt", "a", "--top_p", "0")
  assert code == 1 and "--top_p must be in (0, 1]" in err
  with pytest.raises(UserError, match="bidirectional encoder"):
    generate.check_causal(tiny_config("lion_s").model)
  model, cfg = spread_model("gpt2")
  with pytest.raises(UserError, match=f"learned position table has {cfg.max_positions}"):
    generate.Generator(model, vocab_size=cfg.vocab_size).start([[1] * cfg.max_positions], max_new_tokens=1)


def test_bench_check_compares_the_fused_step_and_falls_back_to_xla_when_it_fails(tmp_path, monkeypatch):
  bench = bench_generate.Bench(argparse.Namespace(target=[2, 16], out_dir=str(tmp_path)))
  model = lm.build(tiny_config("mamba").model)
  bench.check("mamba-tiny", model)
  ok = bench.results[-1]
  assert ok["status"] == "ok" and ok["output"] < 1e-5 and ok["ssm_state"] < 1e-5 and ok["conv_state"] == 0

  def broken(*args, **kwargs):
    raise RuntimeError("triton: no kernel for you\nmore detail")
  monkeypatch.setattr(selective_scan_step, "decode_step", broken)
  bench.check("mamba-tiny", model)
  assert bench.results[-1]["status"] == "failed: RuntimeError: triton: no kernel for you"
  assert all(block.mixer.scan_impl == "reference" for block in model.backbone.blocks)


def test_bench_merge_into_fills_a_grid_over_several_runs(tmp_path, capsys):
  """A second run's points replace the first run's same points and add new ones; the table lists both
  commands; a run measured with another target, or a missing file, is refused."""
  first, second = tmp_path / "first", tmp_path / "second"
  bench_generate.main(["--quick", "--models", "mamba-130m", "--end_to_end=", "--no_plots", "--out_dir", str(first)])
  earlier = json.loads((first / "bench_generate.json").read_text())
  earlier["results"] = [r for r in earlier["results"] if r["batch"] != 8]  # A point the first run skipped.
  kept = next(r for r in earlier["results"] if r["batch"] == 1)
  kept["tokens_per_s"] = 12345.0  # Marks the point the second run does not measure again.
  (first / "bench_generate.json").write_text(json.dumps(earlier))
  bench_generate.main(["--quick", "--models", "mamba-130m", "--batches", "8", "--end_to_end=", "--no_plots",
                       "--steps_per_check", "4",  # Its 8 new tokens as 2 blocks.
                       "--out_dir", str(second), "--merge_into", str(first / "bench_generate.json")])
  merged = json.loads((second / "bench_generate.json").read_text())
  keys = [bench_generate.point_key(r) for r in merged["results"]]
  assert len(keys) == len(set(keys)) and ("mamba-130m", "decode", 8, 64) in keys
  assert next(r for r in merged["results"] if r["batch"] == 1)["tokens_per_s"] == 12345.0
  assert merged["commands"][0] == earlier["commands"][0] and "--merge_into" in merged["commands"][1]
  table = (second / "generation_table.md").read_text()
  assert "| mamba-130m | 8 | 64 |" in table and "; then `python scripts/bench_generate.py --quick" in table

  earlier["args"]["target"] = [64, 2048]
  (first / "bench_generate.json").write_text(json.dumps(earlier))
  with pytest.raises(SystemExit, match=r"measured with other target \(\[64, 2048\] against \[4, 64\]\)"):
    bench_generate.main(["--quick", "--out_dir", str(second), "--merge_into", str(first / "bench_generate.json")])
  with pytest.raises(SystemExit, match="does not exist"):
    bench_generate.main(["--quick", "--out_dir", str(second), "--merge_into", str(tmp_path / "none.json")])
  with pytest.raises(SystemExit):
    bench_generate.main(["--quick", "--out_dir", str(second), "--new_tokens", "10", "--steps_per_check", "4"])
  assert "--new_tokens 10 must be a multiple of --steps_per_check 4" in capsys.readouterr().err
