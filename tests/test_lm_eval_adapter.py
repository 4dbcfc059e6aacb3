"""The lm-eval model "seqmodels": a local multiple-choice task gives our harness's acc and per-choice
log-likelihoods (Python API and `python -m seqmodels.lm_eval_adapter`), an installed seqmodels makes
lm-eval's own registry find "seqmodels", loglikelihood_rolling gives text perplexity's summed
NLL, and greedy generate_until equals argmax decoding by repeated full forwards."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

from conftest import REPO, tiny_config  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from seqmodels import evaluate, hf_mamba, lm, lm_eval_adapter, trainer, zero_shot  # noqa: E402
from seqmodels.errors import UserError  # noqa: E402

TASK_DIR = os.path.join(REPO, "tests", "fixtures", "lm_eval_task")
TASK = "seqmodels_copa_mini"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  trainer.train(tiny_config("mamba", total_steps=8), path, progress=False)
  return path


@pytest.fixture
def local_datasets(tmp_path, monkeypatch):
  """Runs from the task folder (its data_files is relative) with a private datasets cache."""
  import datasets
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.chdir(TASK_DIR)


def our_copa(workdir, tmp_path):
  """Our harness on the task's JSONL: (acc, per-request log-likelihoods)."""
  os.makedirs(tmp_path / "copa")
  shutil.copy(os.path.join(TASK_DIR, "copa_mini.jsonl"), tmp_path / "copa")
  items = zero_shot.load_task("copa", str(tmp_path))
  loaded = evaluate.load(workdir)
  acc = evaluate.zero_shot_tasks(loaded, {"copa": items}, progress=False)["copa"]["acc"]
  tokenizer = evaluate.model_tokenizer(loaded, None)
  requests = [zero_shot.encode_request(tokenizer, c, x) for item in items
              for c, x in zip(item.contexts, item.continuations)]
  lls = [ll for ll, _ in zero_shot.loglikelihoods(loaded.model, requests, batch_size=8, progress=False)]
  return acc, lls


def test_simple_evaluate_matches_our_harness(workdir, tmp_path, local_datasets):
  out = lm_eval.simple_evaluate(model="seqmodels", model_args=f"workdir={workdir},batch_size=4", tasks=[TASK],
                                task_manager=TaskManager(include_path=TASK_DIR), log_samples=True)
  acc, lls = our_copa(workdir, tmp_path)
  assert out["results"][TASK]["acc,none"] == pytest.approx(acc)
  samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
  theirs = [ll for s in samples for ll, _ in (r[0] for r in s["resps"])]
  np.testing.assert_allclose(theirs, lls, rtol=1e-5)
  # The scores differ between choices, so acc reflects the model, not ties.
  assert len(set(np.round(lls, 4))) == len(lls)


def test_command_line(workdir, tmp_path):
  argv = [sys.executable, "-m", "seqmodels.lm_eval_adapter"]
  env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_DATASETS_OFFLINE": "1",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      argv + ["--model", "seqmodels", "--model_args", f"workdir={workdir}", "--tasks", TASK, "--include_path",
              TASK_DIR, "--output_path", str(tmp_path / "out")],
      cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  with open(path) as f:
    acc = json.load(f)["results"][TASK]["acc,none"]
  assert acc == pytest.approx(our_copa(workdir, tmp_path)[0])


def test_installed_hook_lets_bare_lm_eval_find_seqmodels(tmp_path):
  """What `lm_eval --model seqmodels` needs; the run itself is the `python -m` test above."""
  if "seqmodels_lm_eval_hook" not in sys.modules:
    pytest.skip("seqmodels is not pip-installed here, so seqmodels_lm_eval.pth is absent")
  assert os.path.isfile(os.path.join(os.path.dirname(sys.executable), "lm_eval"))
  script = ("import sys; idle = [m for m in ('lm_eval', 'seqmodels') if m in sys.modules]; "
            "from lm_eval.api.registry import get_model; cls = get_model('seqmodels'); "
            "print(idle, cls.__module__, cls.__name__, get_model('dummy').__name__)")
  # From an empty folder: the installed package, not this checkout on the path, must be found.
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  # Start-up imports neither package; lm-eval's own models stay registered next to ours.
  assert result.stdout.split() == ["[]", "seqmodels.lm_eval_adapter", "SeqmodelsLM", "DummyLM"]


def test_loglikelihood_rolling_is_text_perplexity_nll(workdir, tmp_path):
  model = lm_eval_adapter.SeqmodelsLM(workdir=workdir)
  short = "The cat sat on the mat."
  long = "Language models assign probabilities to text, one token after another, in windows."  # > seq_len
  requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([short, long, ""])]
  rolling = model.loglikelihood_rolling(requests, disable_tqdm=True)
  for text, ll in zip([short, long], rolling):
    path = tmp_path / f"{len(text)}.txt"
    path.write_text(text)
    scores = evaluate.text_perplexity(model.loaded, [str(path)], progress=False)[str(path)]
    assert scores["tokens"] == len(text)
    np.testing.assert_allclose(ll, -scores["loss"] * scores["tokens"], rtol=1e-5)
  assert rolling[2] == 0.0


def reference_greedy(adapter, prompt_text: str, n: int) -> list[int]:
  """Argmax decoding by a full forward over the whole sequence for each new token; stops at EOS."""
  tokens, eos = adapter.tokenizer.encode(prompt_text), adapter.tokenizer.eos_id
  forward = nnx.jit(lambda model, x: model(x))
  generated = []
  for _ in range(n):
    sequence = tokens + generated
    # Causal: zeros after the sequence leave its logits alone, and one padded shape compiles once.
    padded = np.zeros((1, len(tokens) + n), np.int32)
    padded[0, :len(sequence)] = sequence
    logits = np.asarray(forward(adapter.loaded.model, padded))
    token = int(np.argmax(logits[0, len(sequence) - 1, :adapter.model_config.vocab_size]))
    if token == eos:
      break
    generated.append(token)
  return generated


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])  # A recurrent state; a learned-position KV cache.
def test_generate_until_is_greedy_and_stops_at_until(arch, monkeypatch):
  # A briefly trained tiny model, or a random one with a tied head, repeats one byte, which would hide
  # decoding slips; a random untied head does not.
  config = tiny_config(arch, **{"model.tie_embeddings": False})
  model = lm.build(config.model, seed=1)
  monkeypatch.setattr(evaluate, "load", lambda workdir, step: evaluate.LoadedModel(model, config, 0, workdir))
  adapter = lm_eval_adapter.SeqmodelsLM(workdir="somewhere")
  prompt = "Once upon a time"
  expected = reference_greedy(adapter, prompt, 12)
  assert len(set(expected)) >= 4
  [text] = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)],
                                  disable_tqdm=True)
  assert text == adapter.tokenizer.decode(expected)

  # A stop string inside the greedy text ends decoding there and is cut off.
  k = next(k for k in range(2, len(expected)) if expected[k] < 128 and expected[k] not in expected[:k])
  stop = chr(expected[k])
  steps = []
  step = lm_eval_adapter._greedy_step
  monkeypatch.setattr(lm_eval_adapter, "_greedy_step", lambda *a: steps.append(1) or step(*a))
  [text] = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)],
                                  disable_tqdm=True)
  assert text == adapter.tokenizer.decode(expected[:k])
  assert len(steps) == k  # The prefill gives token 0; token k comes from step k, then decoding stops.


def test_hf_checkpoint_scores_like_its_workdir(workdir, tmp_path):
  loaded = evaluate.load(workdir)
  hf_mamba.save_checkpoint(str(tmp_path / "hf"), loaded.config.model, nnx.to_pure_dict(nnx.state(loaded.model)))
  requests = [Instance("loglikelihood", {}, ("The man turned on the faucet, therefore", " water flowed."), 0)]
  ours = lm_eval_adapter.SeqmodelsLM(workdir=workdir).loglikelihood(requests, disable_tqdm=True)
  hf = lm_eval_adapter.SeqmodelsLM(checkpoint=str(tmp_path / "hf"), tokenizer="byte",
                                   batch_size=2).loglikelihood(requests, disable_tqdm=True)
  np.testing.assert_allclose(hf[0][0], ours[0][0], rtol=1e-5)


def test_refuses_encoders_and_ambiguous_model_args(monkeypatch):
  config = tiny_config("lion_lit")
  monkeypatch.setattr(evaluate, "load", lambda workdir, step: evaluate.LoadedModel(None, config, 0, workdir))
  with pytest.raises(UserError, match="bidirectional encoder"):
    lm_eval_adapter.SeqmodelsLM(workdir="somewhere")
  with pytest.raises(UserError, match="exactly one of"):
    lm_eval_adapter.SeqmodelsLM()
  with pytest.raises(UserError, match="exactly one of"):
    lm_eval_adapter.SeqmodelsLM(workdir="a", checkpoint="b")
