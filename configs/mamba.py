"""Mamba language models (Gu & Dao, 2023), at the paper's sizes and a CPU-sized `tiny`.

Launch (first variant is the default):

  python train.py --config configs/mamba.py:tiny --workdir runs/mamba_tiny

`tiny` (4 x 128, 0.5M parameters) trains on the embedded Tiny Shakespeare with the byte tokenizer
in 3.5 minutes on a 2-core CPU (about 6,000 tokens/s). Measured: validation loss 1.63 at step 300
and 1.50 nats/byte at step 600, against the corpus's unigram entropy of 3.31 nats/byte.

Paper sizes (layers / d_model, GPT-NeoX vocab 50277 padded to 50280, counts from the paper):

  130m: 24 / 768 (129.1M)   370m: 48 / 1024 (371.5M)   790m: 48 / 1536 (793.2M)
  1.4b: 48 / 2048 (1372.2M) 2.8b: 64 / 2560 (2768.3M)

  python train.py --config configs/mamba.py:130m --config.data.train_files=/data/pile/*.jsonl \
      --workdir runs/mamba_130m

They use the GPT-3 recipe with 5x its learning rate, 0.5M-token batches of 2048-token sequences and
about 20 tokens per parameter, as in the paper's scaling runs.

On one GPU the fastest steps measured (H100, 8 x 2048 a step, each step synchronized; README
"Session 11") add `--config.model.fused_inner=True --config.model.remat=none` and keep the layers
unscanned, where `command_buffers=auto` turns XLA's CUDA graphs off: 130m 238k-243k tokens/s in
15.4 GB, 370m 95k-97k in 35.7 GB. Unscanned, the step compiles in 1.5 to 4 minutes (130m) and
8 minutes (370m) on a fresh machine. `--config.model.scan_layers=True --config.model.remat=block`
compiles one block instead of all of them and needs less than half the memory, at 225k and 90k
tokens/s.
"""

from configs import base
from seqmodels.config import select_variant

# name: (n_layer, d_model, learning_rate, total_steps)
PAPER_SIZES = {
    "130m": (24, 768, 3e-3, 4800),
    "370m": (48, 1024, 1.5e-3, 13400),
    "790m": (48, 1536, 1.25e-3, 28600),
    "1.4b": (48, 2048, 1e-3, 49600),
    "2.8b": (64, 2560, 8e-4, 100000),
}
VARIANTS = {"tiny": None, **PAPER_SIZES}


def mamba_model():
  model = base.model_defaults()
  model.architecture = "mamba"
  model.d_state = 16
  model.expand = 2
  model.d_conv = 4
  model.dt_rank = 0  # 0: ceil(d_model / 16).
  model.dt_min = 1e-3
  model.dt_max = 0.1
  model.dt_init_floor = 1e-4
  model.scan_impl = "auto"
  # The mixer's conv, x_proj, dt_proj and scan as one custom_vjp with a conv kernel
  # (kernels/mamba_inner.py); one GPU, or CPU in interpret mode. On one H100 it trains 130m 3.2%
  # faster (README, bench_train.py); off by default, as it refuses a multi-device mesh.
  model.fused_inner = False
  return model


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = base.get_base_config()
  config.model = mamba_model()
  if name == "tiny":
    config.model.n_layer, config.model.d_model = 4, 128
    base.tiny_run(config, learning_rate=3e-3)
    return config
  n_layer, d_model, lr, steps = size
  config.model.n_layer, config.model.d_model = n_layer, d_model
  base.paper_run(config, vocab_size=50277, tokenizer="gpt-neox", batch_size=256, seq_len=2048,
                 learning_rate=lr, total_steps=steps, warmup_steps=min(2000, steps // 10))
  return config
