"""LinearGPT (Suresh & P, 2024): GPT-2 whose width halves after every 2 blocks, by a Linear.

Launch (first variant is the default):

  python train.py --config configs/linear_gpt.py:tiny --workdir runs/linear_gpt_tiny

`tiny` (blocks at widths 128, 128, 64, 64, head at 32, 4 heads, byte tokenizer) trains on the
embedded Tiny Shakespeare on a CPU.

`8x512` is the paper's "lgpt", published as 36.4M parameters: 8 heads throughout, blocks in pairs
at widths 512, 256, 128, 64, a Linear(w, w / 2) with bias after each pair, so the final LayerNorm
and the untied head read width 32:

  token embedding 50304 x 512                         25,755,648
  positions 1024 x 512                                   524,288
  2 blocks at each w of 512, 256, 128, 64:
    2 x sum(12 w^2 + 4 w)                              8,363,520
  Linear(w, w / 2) + bias, w = 512 .. 64                 174,560
  final LayerNorm 2 x 32                                      64
  head 32 x 50304                                      1,609,728
  total                                               36,427,808   (36.4M)

  python train.py --config configs/linear_gpt.py:8x512 \
      --config.data.train_files=/data/fineweb_edu/*.jsonl --workdir runs/linear_gpt_8x512

`model.blocks_per_stage` (2) sets how many blocks run between halvings; model.n_layer must be a
multiple of it and model.d_model a multiple of 2^(n_layer / blocks_per_stage). Training recipe:
see configs/gpt2.py.
"""

from configs import gpt2
from seqmodels.config import select_variant

VARIANTS = gpt2.VARIANTS


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = gpt2.family_config("linear_gpt", name, size)
  config.model.blocks_per_stage = 2
  return config
