"""Zero-shot tasks: loaders (shared/data and Hugging Face layouts), scoring against a direct forward
pass, metric definitions, the eval.py CLI and periodic evaluation during training."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from seqmodels import evaluate, lm, trainer, zero_shot
from seqmodels.errors import UserError
from seqmodels.tokenizers import ByteTokenizer

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")


def shared_task(task, limit):
  if not os.path.isdir(os.path.join(SHARED, task)):
    pytest.skip(f"{SHARED}/{task} is absent")
  return zero_shot.load_task(task, SHARED, limit)


def write_task(tmp_path, task, records, name="mine.jsonl"):
  folder = tmp_path / task
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(tmp_path)


# Loaders on the shared/data files.


def test_shared_lambada_and_hellaswag():
  item = shared_task("lambada_openai", 2)[0]
  assert item.contexts[0].endswith("I don't care about")
  assert item.continuations == (" signs",)
  item = shared_task("hellaswag", 3)[0]
  assert item.contexts == ("Roof shingle removal: A man is sitting on a roof. he",) * 4
  assert item.continuations[3] == " starts pulling up roofing on a roof."
  assert item.choices[3] == "starts pulling up roofing on a roof." and item.gold == 3


def test_shared_piqa_takes_labels_from_the_lst_file():
  items = shared_task("piqa", 3)
  assert items[0].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
  assert items[0].continuations[0].startswith(" Provide the guinea pig with a cage")
  assert [i.gold for i in items] == [0, 1, 1]  # The first lines of valid-labels.lst.


def test_shared_arc_prompt_and_padded_choices_are_deduplicated():
  items = shared_task("arc_easy", 94)
  assert items[0].contexts[0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                                  "of most food webs?\nAnswer:")
  assert items[0].continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
  assert items[0].gold == 0
  padded = items[93]  # SOURCE.md: item 93 repeats a distractor.
  assert len(padded.choices) == 3 == len(set(padded.choices))
  raw = json.loads(open(os.path.join(SHARED, "arc_easy", "arc_easy_llmfoundry.jsonl")).readlines()[93])
  assert padded.choices[padded.gold] == raw["choices"][raw["gold"]]
  assert len(shared_task("arc_challenge", 2)[0].choices) == 4


def test_shared_winogrande_copa_boolq_openbookqa():
  item = shared_task("winogrande", 1)[0]
  assert item.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
  assert item.continuations == (" always got the easier cases.",) * 2 and item.gold == 1
  item = shared_task("copa", 1)[0]
  assert item.contexts[0] == "The man turned on the faucet, therefore"
  assert item.continuations == (" the toilet filled with water.", " water flowed from the spout.") and item.gold == 1
  item = shared_task("boolq", 1)[0]
  assert item.contexts[0].startswith("All biomass goes through")  # lm-eval has no "Passage: " label.
  assert item.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
  assert item.continuations == (" no", " yes") and item.gold == 0
  item = shared_task("openbookqa", 1)[0]
  assert item.contexts[0].endswith("they decide the best way to save money is to")
  assert item.continuations[1] == " quit eating lunch out" and item.gold == 1


# Loaders on Hugging Face layouts, and malformed lines.


def test_hugging_face_layouts(tmp_path):
  d = write_task(tmp_path, "hellaswag", [{
      "activity_label": "Making a cake", "ctx_a": "A woman stands in a kitchen.", "ctx_b": "she",
      "endings": ["cracks eggs [title] into a bowl.", "[step] sings  loudly."], "label": "0"}])
  item = zero_shot.load_task("hellaswag", d)[0]
  assert item.contexts[0] == "Making a cake: A woman stands in a kitchen. She"
  # As in lm-eval, stripping comes before the tags are dropped, so "[step] " leaves its space.
  assert item.choices == ("cracks eggs. into a bowl.", " sings loudly.") and item.gold == 0

  write_task(tmp_path, "piqa", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat it.", "label": 0}])
  item = zero_shot.load_task("piqa", d)[0]
  assert item.contexts[0] == "Question: Open a jar\nAnswer:" and item.continuations == (" Twist the lid.", " Eat it.")

  write_task(tmp_path, "arc_challenge", [{"id": "x", "question": "Which is a gas?", "answerKey": "3", "choices": {
      "text": ["rock", "water", "steam"], "label": ["1", "2", "3"]}}])
  item = zero_shot.load_task("arc_challenge", d)[0]
  assert item.contexts[0] == "Question: Which is a gas?\nAnswer:" and item.gold == 2

  write_task(tmp_path, "openbookqa", [{"id": "7", "question_stem": "The sun is", "answerKey": " B", "choices": {
      "text": ["cold", "hot", "blue", "small"], "label": ["A", "B", "C", "D"]}}])
  item = zero_shot.load_task("openbookqa", d)[0]
  assert item.contexts[0] == "The sun is" and item.continuations[1] == " hot" and item.gold == 1

  write_task(tmp_path, "copa", [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
                                 "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0}])
  item = zero_shot.load_task("copa", d)[0]
  assert item.contexts[0] == "My body cast a shadow over the grass because"
  assert item.continuations == (" The sun was rising.", " The grass was cut.") and item.gold == 0

  write_task(tmp_path, "boolq", [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."}])
  item = zero_shot.load_task("boolq", d)[0]
  assert item.contexts[0] == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:" and item.gold == 1

  write_task(tmp_path, "winogrande", [{"sentence": "The cup fit in the bag because the _ was small.",
                                       "option1": "cup", "option2": "bag", "answer": "1"}])
  item = zero_shot.load_task("winogrande", d)[0]
  assert item.contexts == ("The cup fit in the bag because the cup", "The cup fit in the bag because the bag")
  assert item.continuations == (" was small.", " was small.") and item.gold == 0

  write_task(tmp_path, "lambada_openai", [{"text": "He said hello"}])
  item = zero_shot.load_task("lambada_openai", d)[0]
  assert item.contexts == ("He said",) and item.continuations == (" hello",)


def test_malformed_line_names_file_and_line(tmp_path):
  d = write_task(tmp_path, "copa", [{"query": "It rained, therefore", "choices": ["a", "b"], "gold": 0},
                                    {"query": "It rained, therefore", "gold": 0}])
  with pytest.raises(UserError, match=r"copa/mine.jsonl:2: expected field 'choices' of type list; a copa line holds"):
    zero_shot.load_task("copa", d)
  write_task(tmp_path, "boolq", [{"query": "q", "choices": ["no", "yes"], "gold": 3}])
  with pytest.raises(UserError, match=r"boolq/mine.jsonl:1: expected a gold index in 0..1"):
    zero_shot.load_task("boolq", d)
  write_task(tmp_path, "piqa", ['{"goal": "x", "sol1": "a",'])
  with pytest.raises(UserError, match=r"piqa/mine.jsonl:1: not valid JSON"):
    zero_shot.load_task("piqa", d)
  with pytest.raises(UserError, match="unknown task"):
    zero_shot.task_names("copa,nope")
  with pytest.raises(UserError, match="no data for task hellaswag"):
    zero_shot.load_task("hellaswag", str(tmp_path / "missing"))


# Scoring.


@pytest.fixture(scope="module")
def model():
  return lm.build(tiny_config("gpt").model, seed=1)


forward = nnx.jit(lambda model, tokens: model(tokens))


def direct_score(model, context, continuation):
  """Summed log-probability of the continuation and the greedy flag, from one unpadded forward pass."""
  tokens = np.asarray(context + continuation)
  logits = np.asarray(forward(model, tokens[None, :-1])[0], np.float64)
  logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  positions = np.arange(len(context) - 1, len(tokens) - 1)
  targets = tokens[len(context):]
  return logprobs[positions, targets].sum(), bool((logits[positions].argmax(-1) == targets).all())


def test_scores_match_a_direct_forward_pass_with_and_without_bucketing(model):
  rng = np.random.default_rng(0)
  requests = [(list(rng.integers(0, 256, n)), list(rng.integers(0, 256, k))) for n, k in [(5, 3), (12, 7), (1, 1),
                                                                                          (17, 2), (40, 9)]]
  requests.append((requests[1][0], requests[1][1][:3]))  # A prefix of another request: scored inside it.
  requests.append(requests[0])  # A duplicate.
  context = list(b"The cat")
  greedy_token = int(np.asarray(forward(model, np.asarray(context)[None]))[0, -1].argmax())
  requests.append((context, [greedy_token]))
  requests.append((context, [(greedy_token + 1) % 256]))
  expected = [direct_score(model, c, x) for c, x in requests]
  assert [g for _, g in expected[-2:]] == [True, False]
  for batch_size, bucket_min in [(1, 1), (4, 16)]:
    got = zero_shot.loglikelihoods(model, requests, batch_size=batch_size, bucket_min=bucket_min, progress=False)
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected], rtol=1e-5, atol=1e-5)
    assert [g for _, g in got] == [g for _, g in expected]


def test_max_length_keeps_the_last_tokens(model):
  context, continuation = list(range(30, 50)), [7, 8, 9]
  (ll, _), = zero_shot.loglikelihoods(model, [(context, continuation)], batch_size=2, max_length=8, progress=False)
  np.testing.assert_allclose(ll, direct_score(model, context[-6:], continuation)[0], rtol=1e-5)


def test_bucket_lengths():
  assert [zero_shot.bucket_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
  assert [zero_shot.bucket_length(n, 1) for n in (1, 3, 4, 5)] == [1, 4, 4, 8]


def test_requests_are_split_as_lm_eval_splits_them():
  tok = ByteTokenizer()
  assert zero_shot.encode_request(tok, "the cat sat on the", " mat") == (list(b"the cat sat on the"), list(b" mat"))
  assert zero_shot.encode_request(tok, "Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
  assert zero_shot.encode_request(tok, "", "hi") == ([tok.eos_id], list(b"hi"))


def test_acc_norm_divides_by_characters():
  item = zero_shot.multiple_choice("Q", ["a", "bbbbbbbb"], gold=1)
  assert item.continuations == (" a", " bbbbbbbb")
  # -2 / 1 char < -4 / 8 chars: the raw log-likelihood picks "a", the normalized one "bbbbbbbb".
  r = zero_shot.task_metrics("piqa", [item], [(-2.0, False), (-4.0, False)])
  assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_lambada_acc_and_perplexity():
  items = [zero_shot.lambada({"text": "a b c"}), zero_shot.lambada({"text": "d e"})]
  r = zero_shot.task_metrics("lambada_openai", items, [(-1.0, True), (-3.0, False)])
  assert r["acc"] == 0.5 and r["n"] == 2
  np.testing.assert_allclose(r["ppl"], math.exp(2.0))


def test_winogrande_scores_the_shared_suffix_under_each_option(model, tmp_path):
  records = [{"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
              "option2": "case", "answer": "1"},
             {"sentence": "Ann asked Mary what time it was because _ had no watch.", "option1": "Ann",
              "option2": "Mary", "answer": "2"}]
  items = zero_shot.load_task("winogrande", write_task(tmp_path, "winogrande", records))
  tok = ByteTokenizer()
  correct = []
  for record, item in zip(records, items):
    blank = record["sentence"].index("_")
    suffix = list((" " + record["sentence"][blank + 1:].strip()).encode())
    lls = [direct_score(model, list((record["sentence"][:blank] + record[o]).encode()), suffix)[0]
           for o in ("option1", "option2")]
    correct.append(int(np.argmax(lls)) == int(record["answer"]) - 1)
  r = zero_shot.evaluate(model, tiny_config("gpt").model, tok, {"winogrande": items}, batch_size=4, progress=False)
  assert r["winogrande"] == {"acc": float(np.mean(correct)), "n": 2}


def test_encoders_are_refused():
  with pytest.raises(UserError, match="bidirectional encoder"):
    zero_shot.check_causal(tiny_config("lion_lit").model)


# End to end.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train(tiny_config("mamba", total_steps=4), workdir, progress=False)
  return workdir


def test_eval_cli_writes_task_json(trained, tmp_path):
  if not os.path.isdir(SHARED):
    pytest.skip(f"{SHARED} is absent")
  text = tmp_path / "t.txt"
  text.write_text("To be, or not to be.")
  out = subprocess.run([sys.executable, "eval.py", "--workdir", trained, "--tasks", "copa,piqa", "--limit", "8",
                        "--data_dir", SHARED, "--batch_size", "4", "--text", str(text)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "| copa | 8 |" in out.stdout and "| piqa | 8 |" in out.stdout and "| all |" in out.stdout
  result = json.load(open(os.path.join(trained, "eval", "4.json")))
  assert result["step"] == 4 and set(result["tasks"]) == {"copa", "piqa"}
  assert set(result["tasks"]["piqa"]) == {"acc", "acc_norm", "n"} and set(result["tasks"]["copa"]) == {"acc", "n"}
  for r in result["tasks"].values():
    assert r["n"] == 8 and 0 <= r["acc"] <= 1 and r["acc"] * 8 == round(r["acc"] * 8)
  assert result["text"]["all"]["tokens"] == len("To be, or not to be.")


def test_tokenizer_override_must_fit_the_model(trained):
  loaded = evaluate.load(trained)
  with pytest.raises(UserError, match="tokenizer gpt-neox has 50277 tokens but the model only 257"):
    evaluate.zero_shot_tasks(loaded, {}, tokenizer="gpt-neox")
  assert evaluate.zero_shot_tasks(loaded, {}, tokenizer="byte") == {}


def test_data_dir_defaults_to_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("SEQMODELS_DATA", str(tmp_path))
  assert zero_shot.data_dir_or_env(None) == str(tmp_path)
  monkeypatch.delenv("SEQMODELS_DATA")
  with pytest.raises(UserError, match="pass --data_dir DIR or set SEQMODELS_DATA"):
    zero_shot.load_tasks("copa", None)


def test_periodic_eval_during_training_logs_task_metrics(tmp_path):
  records = [{"premise": f"The {w} fell.", "choice1": "It was heavy.", "choice2": "It was late.", "question": "cause",
              "label": i % 2} for i, w in enumerate(["box", "leaf", "man"])]
  data_dir = write_task(tmp_path / "data", "copa", records)
  config = tiny_config("mamba", total_steps=4, eval_tasks=("copa",), eval_every=2, eval_limit=2,
                       eval_data_dir=data_dir)
  trainer.train(config, str(tmp_path / "run"), progress=False)
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in logged if "eval/copa/acc" in r] == [2, 4]
  assert all(r["eval/copa/acc"] in (0.0, 0.5, 1.0) for r in logged if "eval/copa/acc" in r)
