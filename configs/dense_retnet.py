"""DenseRetNet language models (He et al., 2024, DenseSSM) at the released sizes and a CPU `tiny`.

Launch (first variant is the default):

  python train.py --config configs/dense_retnet.py:tiny --workdir runs/dense_retnet_tiny

`tiny` (4 x 128, 2 heads, dense connections from m = 2 previous layers) trains on the embedded
Tiny Shakespeare with the byte tokenizer on a CPU.

Released sizes (layers / d_model / heads; keys d/2, values 2d, no FFN, RMSNorm eps 1e-6, LLaMA
vocab 32000, untied embeddings; m = 1 as in the released configs, `--config.model.dense_layers`
changes it):

  350m: 16 / 1536 / 2    1.3b: 25 / 2560 / 4

They need LLaMA's tokenizer as a tokenizer.json (not shipped):

  python train.py --config configs/dense_retnet.py:350m --config.data.tokenizer=/path/to/llama/tokenizer.json \
      --config.data.train_files=/data/pile/*.jsonl --workdir runs/dense_retnet_350m

Per block: W_q, W_k (d x d/2), W_h (d x 4d), W_o (2d x d) make 7 d^2; each pair of gates (G^k_i,
G^v_i) adds 9 d^2 / 64 in the layers that have one; the embedding and head add 2 x 32000 d. The
counts are 367.6M for `350m` (5.0% over its name) and 1333.1M for `1.3b` (2.5% over): the names
round these. The recipe follows the release's README: 2048-token sequences, a 15B-token subset of
the Pile, AdamW with beta2 0.98 and weight decay 0.01, learning rate 6e-4 with 1.5% warmup; the
batch (its GPU count is not given) is 0.5M tokens here.
"""

from configs import base
from seqmodels.config import select_variant

# name: (n_layer, d_model, n_head)
RELEASED_SIZES = {
    "350m": (16, 1536, 2),
    "1.3b": (25, 2560, 4),
}
VARIANTS = {"tiny": None, **RELEASED_SIZES}


def dense_retnet_model():
  model = base.model_defaults()
  model.architecture = "dense_retnet"
  model.n_head = 2
  model.dense_layers = 2  # m: how many previous layers' raw k and v feed each layer (0: none).
  model.retention_form = "parallel"  # Or "chunkwise" or "recurrent": the training form.
  model.chunk_size = 64  # Time steps per chunk of the chunkwise form.
  model.rope_theta = 10000.0
  model.norm_eps = 1e-6
  model.tie_embeddings = False
  return model


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = base.get_base_config()
  config.model = dense_retnet_model()
  if name == "tiny":
    config.model.n_layer, config.model.d_model = 4, 128
    base.tiny_run(config, learning_rate=2e-3)
    return config
  n_layer, d_model, n_head = size
  config.model.n_layer, config.model.d_model, config.model.n_head = n_layer, d_model, n_head
  config.model.dense_layers = 1
  # 28,600 steps of 0.5M tokens are the paper's 15B tokens; warmup is 1.5% of them.
  base.paper_run(config, vocab_size=32000, tokenizer="llama/tokenizer.json", batch_size=256, seq_len=2048,
                 learning_rate=6e-4, total_steps=28600, warmup_steps=429, beta2=0.98, weight_decay=0.01)
  return config
