"""Zero-shot tasks scored the way lm-evaluation-harness (lm-eval) scores them.

Every task item becomes one (context, continuation) request per choice; a request's score is
log p(continuation | context), summed over the continuation's tokens, plus whether each of those
tokens is the greedy argmax. From these:

    multiple choice  acc       = [argmax_i ll_i == gold]
                     acc_norm  = [argmax_i ll_i / len(choice_i in characters) == gold]
    lambada_openai   acc       = [every token of the last word is the greedy argmax]
                     ppl       = exp(-mean over documents of ll(last word))

Prompts (lm-eval task definitions, EleutherAI/lm-evaluation-harness, lm_eval/tasks/...). A
multiple-choice continuation is lm-eval's target delimiter " " followed by the choice.

    lambada_openai  lambada/lambada_openai.yaml: context = text up to its last space,
                    continuation = " " + last word (no delimiter: output_type loglikelihood).
    hellaswag       hellaswag/utils.py: context = preprocess(activity_label + ": " + ctx_a + " "
                    + ctx_b.capitalize()), choices = preprocess(ending); preprocess strips, turns
                    " [title]" into ". ", drops other [bracketed] tags and double spaces.
    piqa            piqa/piqa.yaml: "Question: {goal}\\nAnswer:", choices sol1, sol2.
    arc_easy,       arc/arc_easy.yaml: "Question: {question}\\nAnswer:", choices choices.text,
    arc_challenge   gold choices.label.index(answerKey).
    openbookqa      openbookqa/openbookqa.yaml: question_stem, choices choices.text,
                    gold choices.label.index(answerKey.lstrip()).
    copa            super_glue/copa/utils.py + default.yaml: premise.strip()[:-1] + " because"
                    (question "cause") or " therefore" ("effect"); choices choice1, choice2.
    boolq           super_glue/boolq/default.yaml: "{passage}\\nQuestion: {question}?\\nAnswer:",
                    choices "no", "yes".
    winogrande      winogrande/preprocess_winogrande.py: partial scoring (Trinh & Le 2018): each
                    option replaces the "_" and ends its context, the continuation is " " + the
                    sentence after the "_", stripped; metric acc.

Each task also reads the llm-foundry layout of shared/data ({"query", "choices", "gold"}, winogrande
{"context_options", "continuation", "gold"}, hellaswag {"query", "endings", "label"}, lambada
{"text"}), detected per line. Those files were preprocessed upstream: llm-foundry's copa lowercases
the first letter of each choice, and the hellaswag copy lacks ctx_b.capitalize(), so their prompts
can differ from lm-eval's in the case of one letter. ARC items padded to four choices by repeating
a distractor are de-duplicated before scoring.

Tokenization follows lm-eval's causal-LM loglikelihood: trailing spaces of the context move to the
continuation, context + continuation is encoded as one string and the continuation's tokens are
those past the context's own encoding; an empty context is the EOS token.
"""

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from seqmodels import lm
from seqmodels.errors import UserError


@dataclasses.dataclass(frozen=True)
class Item:
  """One task item: request i is (contexts[i], continuations[i]); choices[i] sets acc_norm's length."""
  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  choices: tuple[str, ...]
  gold: int


def multiple_choice(context: str, choices, gold: int) -> Item:
  """An item whose choices all follow one context after lm-eval's target delimiter " "."""
  choices = tuple(choices)
  return Item((context,) * len(choices), tuple(" " + c for c in choices), choices, gold)


class _Malformed(Exception):
  """A record without the fields its task needs; the reader adds file:line."""


def _get(record: dict, key: str, kind=str):
  value = record.get(key)
  if not isinstance(value, kind):
    raise _Malformed(f"field '{key}' of type {kind.__name__}")
  return value


def _gold(index, n: int) -> int:
  if isinstance(index, str) and index.strip().isdigit():
    index = int(index)
  if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
    raise _Malformed(f"a gold index in 0..{n - 1}")
  return index


def _labelled_choices(record: dict) -> tuple[list, int]:
  """Hugging Face ARC/OpenBookQA layout: choices {"text": [...], "label": [...]} and answerKey."""
  choices = _get(record, "choices", dict)
  texts, labels = choices.get("text"), choices.get("label")
  answer = _get(record, "answerKey").lstrip()
  if not isinstance(texts, list) or not isinstance(labels, list) or answer not in labels:
    raise _Malformed("choices {text, label} lists and an answerKey among the labels")
  return texts, labels.index(answer)


def _foundry(record: dict) -> tuple[str, list, int]:
  query, choices = _get(record, "query"), _get(record, "choices", list)
  if not choices or not all(isinstance(c, str) for c in choices):
    raise _Malformed("field 'choices' as a list of strings")
  return query, choices, _gold(record.get("gold"), len(choices))


def lambada(record: dict) -> Item:
  text = _get(record, "text")
  if " " not in text:
    raise _Malformed("a text of several space-separated words")
  context, word = text.rsplit(" ", 1)
  return Item((context,), (" " + word,), (word,), 0)


def _hellaswag_preprocess(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag(record: dict) -> Item:
  if "ctx_a" in record:
    ctx = _get(record, "ctx_a") + " " + _get(record, "ctx_b").capitalize()
    query = _hellaswag_preprocess(_get(record, "activity_label") + ": " + ctx)
    endings = [_hellaswag_preprocess(e) for e in _get(record, "endings", list)]
  else:
    query, endings = _get(record, "query"), _get(record, "endings", list)
  return multiple_choice(query, endings, _gold(record.get("label"), len(endings)))


def piqa(record: dict) -> Item:
  solutions = [_get(record, "sol1"), _get(record, "sol2")]
  return multiple_choice(f"Question: {_get(record, 'goal')}\nAnswer:", solutions,
                         _gold(record.get("label"), 2))


def arc(record: dict) -> Item:
  if "question" in record:
    question = _get(record, "question")
    choices, gold = _labelled_choices(record)
  else:
    query, choices, gold = _foundry(record)
    question = query.removeprefix("Question: ")
  # Some items repeat a distractor to pad three choices to four; keep each text once, the gold included.
  unique = list(dict.fromkeys(choices))
  return multiple_choice(f"Question: {question}\nAnswer:", unique, unique.index(choices[gold]))


def openbookqa(record: dict) -> Item:
  if "question_stem" in record:
    stem = _get(record, "question_stem")
    choices, gold = _labelled_choices(record)
  else:
    stem, choices, gold = _foundry(record)
  return multiple_choice(stem, choices, gold)


def copa(record: dict) -> Item:
  if "premise" in record:
    connector = {"cause": "because", "effect": "therefore"}.get(record.get("question"))
    if connector is None:
      raise _Malformed("field 'question' of 'cause' or 'effect'")
    context = _get(record, "premise").strip()[:-1] + " " + connector
    choices = [_get(record, "choice1"), _get(record, "choice2")]
    return multiple_choice(context, choices, _gold(record.get("label"), 2))
  return multiple_choice(*_foundry(record))


def boolq(record: dict) -> Item:
  if "passage" in record:
    answer = record.get("answer", record.get("label"))
    if not isinstance(answer, (bool, int)) or answer not in (0, 1):
      raise _Malformed("field 'answer' (true/false) or 'label' (0/1)")
    context = f"{_get(record, 'passage')}\nQuestion: {_get(record, 'question')}?\nAnswer:"
    return multiple_choice(context, ["no", "yes"], int(answer))
  query, choices, gold = _foundry(record)
  # llm-foundry's query is "Passage: {passage}\nQuestion: {question}?", lm-eval's prompt without the
  # "Passage: " label and "\nAnswer:".
  return multiple_choice(query.removeprefix("Passage: ") + "\nAnswer:", choices, gold)


def winogrande(record: dict) -> Item:
  if "sentence" in record:
    sentence = _get(record, "sentence")
    if "_" not in sentence:
      raise _Malformed("a sentence with a '_' blank")
    blank = sentence.index("_")
    options = [_get(record, "option1"), _get(record, "option2")]
    contexts = [sentence[:blank] + option for option in options]
    suffix = sentence[blank + 1:].strip()
    if record.get("answer") not in ("1", "2"):
      raise _Malformed("field 'answer' of '1' or '2'")
    gold = int(record["answer"]) - 1
  else:
    contexts = _get(record, "context_options", list)
    suffix = _get(record, "continuation").strip()
    if not contexts or not all(isinstance(c, str) for c in contexts):
      raise _Malformed("field 'context_options' as a list of strings")
    gold = _gold(record.get("gold"), len(contexts))
  return Item(tuple(contexts), (" " + suffix,) * len(contexts), (suffix,) * len(contexts), gold)


@dataclasses.dataclass(frozen=True)
class Task:
  file: str  # In <data_dir>/<task>/; any single *.jsonl there is used when this one is absent.
  parse: object  # record -> Item
  metrics: tuple[str, ...]
  expected: str  # What a line must hold, for the error message.


_MC = ("acc", "acc_norm")
TASKS = {
    "lambada_openai": Task("lambada_test.jsonl", lambada, ("acc", "ppl"), '{"text"}'),
    "hellaswag": Task("hellaswag_val.jsonl", hellaswag, _MC,
                      '{"query","endings","label"} or {"ctx_a","ctx_b","activity_label","endings","label"}'),
    "piqa": Task("valid.jsonl", piqa, _MC, '{"goal","sol1","sol2"} with "label" or valid-labels.lst'),
    "arc_easy": Task("arc_easy_llmfoundry.jsonl", arc, _MC,
                     '{"query","choices","gold"} or {"question","choices":{"text","label"},"answerKey"}'),
    "arc_challenge": Task("arc_challenge_llmfoundry.jsonl", arc, _MC,
                          '{"query","choices","gold"} or {"question","choices":{"text","label"},"answerKey"}'),
    "openbookqa": Task("openbook_qa_llmfoundry.jsonl", openbookqa, _MC,
                       '{"query","choices","gold"} or {"question_stem","choices":{"text","label"},"answerKey"}'),
    "winogrande": Task("winogrande_llmfoundry.jsonl", winogrande, ("acc",),
                       '{"context_options","continuation","gold"} or {"sentence","option1","option2","answer"}'),
    "copa": Task("copa_llmfoundry.jsonl", copa, ("acc",),
                 '{"query","choices","gold"} or {"premise","choice1","choice2","question","label"}'),
    "boolq": Task("boolq_llmfoundry.jsonl", boolq, ("acc",),
                  '{"query","choices","gold"} or {"passage","question","answer"}'),
}


def task_names(spec) -> list[str]:
  """Task names from "a,b" or a sequence, checked against TASKS."""
  names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
  names = [n for n in names if n]
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
  return names


def data_dir_or_env(data_dir: str | None) -> str:
  data_dir = data_dir or os.environ.get("SEQMODELS_DATA", "")
  if not data_dir:
    raise UserError("no data directory for the zero-shot tasks; pass --data_dir DIR or set SEQMODELS_DATA")
  return data_dir


def task_file(task: str, data_dir: str) -> str:
  folder = os.path.join(data_dir, task)
  path = os.path.join(folder, TASKS[task].file)
  if os.path.isfile(path):
    return path
  found = sorted(f for f in os.listdir(folder) if f.endswith(".jsonl")) if os.path.isdir(folder) else []
  if len(found) != 1:
    raise UserError(f"no data for task {task}: expected {path} (or one .jsonl file in {folder}); "
                    "point --data_dir at a folder with one subfolder per task")
  return os.path.join(folder, found[0])


def load_task(task: str, data_dir: str, limit: int | None = None) -> list[Item]:
  """The first `limit` items (all when None) of `task` from <data_dir>/<task>/."""
  path = task_file(task, data_dir)
  spec = TASKS[task]
  labels_path, labels = _piqa_labels(path) if task == "piqa" else (None, None)
  items = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if limit is not None and len(items) >= limit:
        break
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise _Malformed("a JSON object")
        if labels is not None and "label" not in record:
          if number > len(labels):
            raise _Malformed(f"a 'label' field or a label on line {number} of {labels_path}")
          record = {**record, "label": labels[number - 1]}
        items.append(spec.parse(record))
      except (json.JSONDecodeError, _Malformed) as e:
        detail = f"expected {e}; " if isinstance(e, _Malformed) else "not valid JSON; "
        raise UserError(f"{path}:{number}: {detail}a {task} line holds {spec.expected}") from None
  if not items:
    raise UserError(f"{path} holds no items; pass a JSONL file with one {task} item per line")
  return items


def _piqa_labels(path: str) -> tuple[str, list[str]]:
  """PIQA's original release keeps the labels in <split>-labels.lst next to <split>.jsonl."""
  labels_path = path.removesuffix(".jsonl") + "-labels.lst"
  if not os.path.isfile(labels_path):
    return labels_path, []
  with open(labels_path) as f:
    return labels_path, [line.strip() for line in f]


# Scoring.


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation tokens as lm-eval's causal-LM loglikelihood splits them."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer.encode(context + continuation)
  context_tokens = tokenizer.encode(context)
  continuation_tokens = whole[len(context_tokens):]
  if not context:
    context_tokens = [tokenizer.eos_id]
  return context_tokens, continuation_tokens


def bucket_length(n: int, minimum: int = 64) -> int:
  """The padded length of a batch holding sequences of up to n inputs: a power of two."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


@nnx.jit
def _token_scores(model, inputs, targets):
  """Log-probability of each target token and whether it is the argmax: two (batch, length) arrays."""
  logits = model(inputs)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return target_logprobs, jnp.argmax(logits, axis=-1) == targets


def loglikelihoods(model, requests, *, batch_size: int, max_length: int | None = None, bucket_min: int = 64,
                   progress: bool = True, desc: str = "") -> list[tuple[float, bool]]:
  """(summed log-likelihood, all greedy) of each (context_tokens, continuation_tokens) request.

  A causal model's forward pass over context + continuation scores every prefix at once, so each
  distinct token sequence runs once, and a sequence that is a prefix of another runs inside it.
  Sequences are padded to a few bucket lengths (powers of two) and batches to `batch_size` rows, so
  a task compiles one shape per bucket. `max_length` keeps the last max_length + 1 tokens, as lm-eval
  truncates from the left.
  """
  sequences = []
  for context, continuation in requests:
    if not continuation:
      raise UserError("a continuation encodes to no tokens; every choice must be non-empty text")
    if max_length and len(continuation) > max_length:
      raise UserError(f"a continuation of {len(continuation)} tokens exceeds the model's {max_length} positions")
    tokens = tuple(context) + tuple(continuation)
    sequences.append(tokens[-(max_length + 1):] if max_length else tokens)
  unique = sorted(set(sequences))
  # In lexicographic order a sequence that is a prefix of any other is a prefix of the next one.
  host = list(range(len(unique)))
  for i in range(len(unique) - 2, -1, -1):
    following = unique[host[i + 1]]
    if unique[i] == following[:len(unique[i])]:
      host[i] = host[i + 1]
  rows = sorted({host[i] for i in range(len(unique))}, key=lambda i: -len(unique[i]))
  scores = {}
  batches = []
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    batches.append((batch, bucket_length(len(unique[batch[0]]) - 1, bucket_min)))
  for batch, length in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
    if max_length:
      length = min(length, max_length)
    tokens = np.zeros((batch_size, length + 1), np.int32)
    for r, i in enumerate(batch):
      tokens[r, :len(unique[i])] = unique[i]
    logprobs, greedy = jax.device_get(_token_scores(model, tokens[:, :-1], tokens[:, 1:]))
    for r, i in enumerate(batch):
      scores[i] = (logprobs[r, :len(unique[i]) - 1].astype(np.float64), greedy[r, :len(unique[i]) - 1])
  index = {seq: i for i, seq in enumerate(unique)}
  results = []
  for tokens, (_, continuation) in zip(sequences, requests):
    i = index[tokens]
    logprobs, greedy = scores[host[i]]
    # Input position p predicts token p + 1: the continuation's tokens end at position len(tokens) - 1.
    span = slice(len(tokens) - 1 - len(continuation), len(tokens) - 1)
    results.append((float(logprobs[span].sum()), bool(greedy[span].all())))
  return results


def task_metrics(task: str, items: list[Item], scores: list[tuple[float, bool]]) -> dict:
  """The task's metrics from the items and the scores of their requests, in order."""
  per_item, offset = [], 0
  for item in items:
    per_item.append(scores[offset:offset + len(item.contexts)])
    offset += len(item.contexts)
  out = {}
  if task == "lambada_openai":
    out["acc"] = float(np.mean([s[0][1] for s in per_item]))
    out["ppl"] = math.exp(-float(np.mean([s[0][0] for s in per_item])))
  else:
    lls = [np.array([ll for ll, _ in s]) for s in per_item]
    out["acc"] = float(np.mean([np.argmax(ll) == item.gold for ll, item in zip(lls, items)]))
    if "acc_norm" in TASKS[task].metrics:
      lengths = [np.array([len(c) for c in item.choices], np.float64) for item in items]
      out["acc_norm"] = float(np.mean([np.argmax(ll / n) == item.gold for ll, n, item in zip(lls, lengths, items)]))
  out["n"] = len(items)
  return out


def check_causal(model_config) -> None:
  if getattr(lm.backbone_class(model_config.architecture), "bidirectional", False):
    raise UserError(f"{model_config.architecture} is a bidirectional encoder; zero-shot tasks score "
                    "continuations with a causal language model")


def max_length(model_config) -> int | None:
  """The longest input the model takes: its learned position table, else unbounded."""
  return model_config.max_positions if model_config.position_embedding == "learned" else None


def evaluate(model, model_config, tokenizer, tasks: dict, *, batch_size: int, progress: bool = True) -> dict:
  """{task: {metric: value, "n": items}} for `tasks`, a dict {task name: list of Items}."""
  check_causal(model_config)
  results = {}
  for task, items in tasks.items():
    requests = [encode_request(tokenizer, c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    scores = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length(model_config),
                            progress=progress, desc=task)
    results[task] = task_metrics(task, items, scores)
  return results


def load_tasks(names, data_dir: str | None, limit: int | None = None) -> dict:
  """{task: items} for the task names ("a,b" or a sequence), from data_dir or $SEQMODELS_DATA."""
  data_dir = data_dir_or_env(data_dir)
  return {task: load_task(task, data_dir, limit) for task in task_names(names)}
