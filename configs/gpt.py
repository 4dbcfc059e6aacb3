"""The Transformer++ baseline (RoPE, SwiGLU, RMSNorm, no biases) at GPT-3 sizes and a CPU `tiny`.

Launch (first variant is the default):

  python train.py --config configs/gpt.py:tiny --workdir runs/gpt_tiny

`tiny` trains on the embedded Tiny Shakespeare with the byte tokenizer on a 2-core CPU in a few
minutes and ends well under the corpus's unigram entropy of 3.3 nats/byte.

Sizes (layers / d_model, head dim 64, GPT-NeoX vocab 50277 padded to 50280, tied embeddings):

  125m: 12 / 768    350m: 24 / 1024    760m: 24 / 1536    1.3b: 24 / 2048

  python train.py --config configs/gpt.py:125m --config.data.train_files=/data/pile/*.jsonl \
      --workdir runs/gpt_125m

They follow the GPT-3 learning rates with 0.5M-token batches of 2048-token sequences.
"""

from configs import base
from seqmodels.config import select_variant

# name: (n_layer, d_model, learning_rate, total_steps)
PAPER_SIZES = {
    "125m": (12, 768, 6e-4, 4800),
    "350m": (24, 1024, 3e-4, 13400),
    "760m": (24, 1536, 2.5e-4, 28600),
    "1.3b": (24, 2048, 2e-4, 49600),
}
VARIANTS = {"tiny": None, **PAPER_SIZES}


def gpt_model():
  model = base.model_defaults()
  model.architecture = "gpt"
  model.n_head = 4
  model.ffn_dim = 0  # 0: 8 d_model / 3 rounded up to a multiple of 256.
  model.rope_theta = 10000.0
  return model


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = base.get_base_config()
  config.model = gpt_model()
  if name == "tiny":
    config.model.n_layer, config.model.d_model, config.model.n_head = 4, 128, 4
    base.tiny_run(config, learning_rate=2e-3)
    return config
  n_layer, d_model, lr, steps = size
  config.model.n_layer, config.model.d_model, config.model.n_head = n_layer, d_model, d_model // 64
  base.paper_run(config, vocab_size=50277, tokenizer="gpt-neox", batch_size=256, seq_len=2048,
                 learning_rate=lr, total_steps=steps, warmup_steps=min(2000, steps // 10))
  return config
