"""ConvGPT (Suresh & P, 2024): GPT-2 whose width halves after every 2 blocks, by a kernel-1 Conv1d.

Launch (first variant is the default):

  python train.py --config configs/conv_gpt.py:tiny --workdir runs/conv_gpt_tiny

`tiny` (blocks at widths 128, 128, 64, 64, head at 32, 4 heads, byte tokenizer) trains on the
embedded Tiny Shakespeare on a CPU.

`8x512` is the paper's "cgpt", published as 36.4M parameters. A kernel-1 Conv1d(w, w / 2) with bias
has the parameters of configs/linear_gpt.py's Linear, so the count is the same 36,427,808 (36.4M);
see that file for the breakdown. The convolution keeps PyTorch's default init, U(+-1/sqrt(w)), where
LinearGPT's Linear starts N(0, 0.02) (see seqmodels/gpt2.py).

  python train.py --config configs/conv_gpt.py:8x512 \
      --config.data.train_files=/data/fineweb_edu/*.jsonl --workdir runs/conv_gpt_8x512

`model.blocks_per_stage` (2) sets how many blocks run between halvings. Training recipe: see
configs/gpt2.py.
"""

from configs import gpt2
from seqmodels.config import select_variant

VARIANTS = gpt2.VARIANTS


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = gpt2.family_config("conv_gpt", name, size)
  config.model.blocks_per_stage = 2
  return config
