"""GPT-2 (learned positions, LayerNorm, GELU MLP, untied head), the baseline of Suresh & P (2024).

Launch (first variant is the default):

  python train.py --config configs/gpt2.py:tiny --workdir runs/gpt2_tiny

`tiny` (4 x 128, 4 heads, byte tokenizer) trains on the embedded Tiny Shakespeare on a CPU.

`8x512` is the paper's "gpt": 8 layers, d_model 512, 8 heads, 1024 learned positions, vocab 50304,
untied head, published as 77.2M parameters. That count is every parameter of the paper's nanoGPT
code with bias=False (no biases in the blocks' Linears), positions and head included:

  token embedding 50304 x 512                         25,755,648
  positions 1024 x 512                                   524,288
  8 blocks x (12 d^2 + 2 LayerNorms x 2 d)            25,182,208   (attention 4 d^2, MLP 8 d^2)
  final LayerNorm 2 d                                      1,024
  head 512 x 50304                                    25,755,648
  total                                               77,218,816   (77.2M)

Our LayerNorms keep GPT-2's bias; nanoGPT's bias=False also drops those (8,704 fewer, 77,210,112).
With biases in every Linear it would be 77,255,680, which does not round to 77.2M.

  python train.py --config configs/gpt2.py:8x512 --config.data.train_files=/data/fineweb_edu/*.jsonl \
      --workdir runs/gpt2_8x512

All four models of the paper (configs/gpt2.py, parallel_gpt.py, linear_gpt.py, conv_gpt.py) train with
the authors' released nanoGPT script: 64 sequences of 1024 tokens per step (16 x 4 accumulation
steps there), AdamW at 3e-4 with 2000 warmup steps and cosine decay to 3e-5 at step 10,000, betas
(0.9, 0.95), weight decay 0.01, clipping at 1.0, on FineWeb-Edu. They tokenize with GPT-2's BPE
(50257 tokens, padded to 50304); the shipped GPT-NeoX tokenizer (50277 tokens) fits the same table,
and --config.data.tokenizer=/path/to/gpt2/tokenizer.json matches them exactly.
"""

from configs import base
from seqmodels.config import select_variant

# name: (n_layer, d_model, n_head)
PAPER_SIZES = {
    "8x512": (8, 512, 8),
}
VARIANTS = {"tiny": None, **PAPER_SIZES}


def gpt2_model(architecture: str):
  model = base.model_defaults()
  model.architecture = architecture
  model.n_head = 4
  model.norm = "layernorm"
  model.position_embedding = "learned"
  model.max_positions = 1024
  model.tie_embeddings = False
  return model


def family_config(architecture: str, name: str, size):
  """The config of variant `name` for any of the four architectures of the paper."""
  config = base.get_base_config()
  config.model = gpt2_model(architecture)
  if name == "tiny":
    config.model.n_layer, config.model.d_model = 4, 128
    base.tiny_run(config, learning_rate=2e-3)
    return config
  config.model.n_layer, config.model.d_model, config.model.n_head = size
  base.paper_run(config, vocab_size=50304, tokenizer="gpt-neox", batch_size=64, seq_len=1024,
                 learning_rate=3e-4, total_steps=10000, warmup_steps=2000, weight_decay=0.01)
  return config


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  return family_config("gpt2", name, size)
