"""ParallelGPT (Suresh & P, 2024): two towers of n_layer / 2 GPT-2 blocks mixed by sigmoid(w).

Launch (first variant is the default):

  python train.py --config configs/parallel_gpt.py:tiny --workdir runs/parallel_gpt_tiny

`tiny` (two towers of 2 blocks at width 128, byte tokenizer) trains on the embedded Tiny
Shakespeare on a CPU.

`8x512` is the paper's "pgpt": two towers of 4 blocks at d_model 512, 8 heads, on configs/gpt2.py's
base, published as 77.7M parameters. The towers hold the same 8 blocks as GPT-2, so the count is
GPT-2's plus the two tower inputs Linear(512, 512) with bias and the mixing weight w:

  GPT-2 8x512 (configs/gpt2.py)                       77,218,816
  2 x (512 x 512 + 512)                                  525,312
  w                                                            1
  total                                               77,744,129   (77.7M)

  python train.py --config configs/parallel_gpt.py:8x512 \
      --config.data.train_files=/data/fineweb_edu/*.jsonl --workdir runs/parallel_gpt_8x512

`model.one_tower_inference=true` makes decoding (prefill and step) run only the tower of weight
sigmoid(w) >= 1/2, the paper's "pgpt-1"; training always runs both. At run time,
`model.backbone.one_tower(u, cache)` does the same for one call, and setting
`model.backbone.one_tower_inference` switches the mode. Training recipe: see configs/gpt2.py.
"""

from configs import gpt2
from seqmodels.config import select_variant

VARIANTS = gpt2.VARIANTS


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = gpt2.family_config("parallel_gpt", name, size)
  config.model.one_tower_inference = False
  return config
