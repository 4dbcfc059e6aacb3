"""The config code configs/lion_lit.py, lion_d.py and lion_s.py share: sizes, MLM and BoolQ recipes.

Each LION file has the variants `tiny`, `base`, `large` (masked-LM pretraining) and `tiny_boolq`,
`base_boolq`, `large_boolq` (BoolQ fine-tuning from the pretraining run of the same size, read
from its default workdir runs/<arch>_<size>).

Sizes (layers x d_model / heads, 512 learned positions): tiny 4 x 128 / 4, base 12 x 768 / 12,
large 24 x 1024 / 16. `tiny` uses the byte tokenizer (257 tokens and the mask token); `base` and
`large` the shipped GPT-NeoX tokenizer (50277 tokens and the mask token, padded to 50280). With
BERT's 30522-token WordPiece vocabulary (padded to 30528) they would have BERT's size (released
BERT: 109.48M and 335.14M, rounded in its paper to 110M and 340M). Parameters:

  variant    tiny    base (BERT vocab)     large (BERT vocab)
  lion_lit   0.91M   124.66M (109.49M)     355.37M (335.15M)
  lion_d     0.91M   124.66M (109.49M)     355.37M (335.15M)
  lion_s     0.91M   124.77M (109.60M)     355.77M (335.54M)
"""

import os

from configs import base
from seqmodels.config import select_variant

# BERT's sizes (Devlin et al., 2019), which the LION paper's MLM models keep:
# name: (n_layer, d_model, n_head)
BERT_SIZES = {"base": (12, 768, 12), "large": (24, 1024, 16)}
SIZES = {"tiny": None, **BERT_SIZES}
VARIANT_NAMES = (*SIZES, *(f"{size}_boolq" for size in SIZES))

# llm-foundry's BoolQ validation set (3270 records), in the shared data folder next to the repo.
BOOLQ = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                      "boolq", "boolq_llmfoundry.jsonl"))


def lion_model(architecture):
  model = base.model_defaults()
  model.architecture = architecture
  model.n_head = 4
  model.ffn_dim = 0  # 0: 4 d_model, as in BERT.
  model.lion_form = "full"  # Or "chunked" or "rnn": the same function of the same weights.
  model.chunk_size = 64  # Keys per chunk of the chunked form.
  model.norm = "layernorm"
  model.norm_eps = 1e-12  # BERT's.
  model.position_embedding = "learned"
  model.max_positions = 512
  return model


def get_config(architecture, arg, path):
  name, _ = select_variant(dict.fromkeys(VARIANT_NAMES), arg, path)
  size, _, task = name.partition("_")
  config = base.get_base_config()
  config.model = lion_model(architecture)
  config.objective = "mlm"
  # BERT's optimizer: Adam with beta2 0.999 and weight decay 0.01.
  config.beta2 = 0.999
  config.weight_decay = 0.01
  if size == "tiny":
    config.model.n_layer, config.model.d_model, config.model.n_head = 4, 128, 4
    config.model.vocab_size = 258  # The byte tokenizer's 257 tokens and the mask token.
    base.tiny_run(config, learning_rate=1e-3)
  else:
    config.model.n_layer, config.model.d_model, config.model.n_head = BERT_SIZES[size]
    # BERT's pretraining: 256 sequences of 512 tokens, 1M steps, peak 1e-4 after 10k warmup steps.
    # The vocabulary is the GPT-NeoX tokenizer's 50277 tokens and the mask token.
    base.paper_run(config, vocab_size=50278, tokenizer="gpt-neox", batch_size=256, seq_len=512,
                   learning_rate=1e-4, total_steps=1_000_000, warmup_steps=10_000, min_lr_ratio=0.0)
  if task == "boolq":
    finetune_on_boolq(config, init_from=os.path.join("runs", f"{architecture}_{size}"), tiny=size == "tiny")
  return config


def finetune_on_boolq(config, *, init_from, tiny):
  """BoolQ: each record's "query" (passage, then question) labelled by "gold" (0 no, 1 yes).

  Only the validation split ships, so its last 10% (327 records, 63.0% "yes") is held out for
  evaluation and the first 2943 train. Queries longer than seq_len keep their last seq_len tokens,
  which hold the question.
  """
  config.objective = "classification"
  config.num_classes = 2
  config.init_from = init_from
  config.data.train_files = (BOOLQ,)
  config.data.val_files = ()
  config.data.val_fraction = 0.1
  config.data.text_field = "query"
  config.data.label_field = "gold"
  config.seq_len = 512
  config.batch_size = 32
  # BERT's GLUE fine-tuning: batch 32, 3 epochs (here about 3 x 92 steps), lr 2e-5 .. 5e-5; the tiny
  # model, barely pretrained, takes a larger step.
  config.total_steps = 276
  config.learning_rate = 1e-3 if tiny else 3e-5
  config.min_lr_ratio = 0.0
  config.warmup_steps = 28
  config.val_every = 92
  config.checkpoint_every = 92
