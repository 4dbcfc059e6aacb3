"""DenseMamba language models (He et al., 2024): Mamba with dense hidden connections, m = 2.

Launch (first variant is the default):

  python train.py --config configs/dense_mamba.py:tiny --workdir runs/dense_mamba_tiny

`tiny` is the tiny Mamba (4 x 128, byte tokenizer, embedded Tiny Shakespeare) with each layer also
reading the SSM states of the two layers below it: 508,032 parameters, 7,680 of them in the gates.
Measured: validation loss 1.64 at step 300 and 1.51 nats/byte at step 600 (the tiny Mamba: 1.63 and
1.50), against the corpus's unigram entropy of 3.31 nats/byte; 23 minutes on a 2-core CPU shared
with other jobs (the extra scans cost time: each connection re-runs a scan).

Sizes mirror configs/mamba.py's 130m and 370m (layers / d_model, GPT-NeoX vocab 50277 padded to
50280); the parameters are Mamba's plus the gate MLPs, d -> d/32 -> 2d, min(l, 2) of them in layer l:

  130m: 24 / 768, 129.1M + 45 gates of 55,296 = 131.6M
  370m: 48 / 1024, 371.5M + 93 gates of 98,304 = 380.7M

  python train.py --config configs/dense_mamba.py:130m --config.data.train_files=/data/pile/*.jsonl \
      --workdir runs/dense_mamba_130m

They train with the Mamba recipe of configs/mamba.py (the paper trains on a 15B-token subset of the
Pile).
"""

from configs import mamba
from seqmodels.config import select_variant

VARIANTS = {"tiny": None, "130m": None, "370m": None}


def get_config(arg=None):
  name, _ = select_variant(VARIANTS, arg, __file__)
  config = mamba.get_config(name)
  config.model.architecture = "dense_mamba"
  config.model.dense_m = 2  # Earlier layers whose states each layer reads.
  config.model.dense_gate_hidden = 0  # 0: ceil(d_model / 32).
  return config
