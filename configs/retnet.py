"""RetNet language models (Sun et al., 2023) at the paper's sizes and a CPU-sized `tiny`.

Launch (first variant is the default):

  python train.py --config configs/retnet.py:tiny --workdir runs/retnet_tiny

`tiny` (4 x 128, 4 heads) trains on the embedded Tiny Shakespeare with the byte tokenizer on a CPU.
`--config.model.retention_form=chunkwise` (or `recurrent`) trains through the other forms of the
same function.

Paper sizes (layers / d_model / heads; key head dim 256, value dim 2d, FFN 2d, LayerNorm):

  1.3b: 24 / 2048 / 8    2.7b: 32 / 2560 / 10    6.7b: 32 / 4096 / 16

  python train.py --config configs/retnet.py:1.3b --config.data.train_files=/data/pile/*.jsonl \
      --workdir runs/retnet_1.3b

The paper does not name its vocabulary or say whether embeddings are tied; these use the shipped
GPT-NeoX tokenizer (50277, padded to 50280) with tied embeddings. Counted as 12 d^2 + 8d per block
(W_Q, W_K d x d; W_V, W_G d x 2d; W_O 2d x d; FFN 2 x d x 2d; two LayerNorms and the GroupNorm's
affine map), plus 50280 d for the embedding and 2d for the final LayerNorm, they come to 1311.3M,
2646.0M and 6649.5M: within 2.1% of the published 1.3B, 2.7B and 6.7B (names shared with GPT-3's
models of these shapes, which count about the same). The recipe is the paper's: 2048-token
sequences in 4M-token batches for 25k steps (100B tokens), AdamW with beta2 0.98 and weight decay
0.05, 375 warmup steps, learning rates 6e-4, 3e-4, 3e-4 (decayed here by cosine, not linearly).
"""

from configs import base
from seqmodels.config import select_variant

# name: (n_layer, d_model, n_head, learning_rate)
PAPER_SIZES = {
    "1.3b": (24, 2048, 8, 6e-4),
    "2.7b": (32, 2560, 10, 3e-4),
    "6.7b": (32, 4096, 16, 3e-4),
}
VARIANTS = {"tiny": None, **PAPER_SIZES}


def retnet_model():
  model = base.model_defaults()
  model.architecture = "retnet"
  model.norm = "layernorm"
  model.n_head = 4
  model.value_factor = 2  # Value (and gate) width in units of d_model.
  model.ffn_factor = 2  # FFN hidden width in units of d_model.
  model.retention_form = "parallel"  # Or "chunkwise" or "recurrent": the training form.
  model.chunk_size = 64  # Time steps per chunk of the chunkwise form.
  # linear_attention impl of the chunkwise form: "chunked" (XLA), "pallas" (kernels) or "auto".
  model.scan_impl = "chunked"
  model.rope_theta = 10000.0
  return model


def get_config(arg=None):
  name, size = select_variant(VARIANTS, arg, __file__)
  config = base.get_base_config()
  config.model = retnet_model()
  if name == "tiny":
    config.model.n_layer, config.model.d_model, config.model.n_head = 4, 128, 4
    base.tiny_run(config, learning_rate=2e-3)
    return config
  n_layer, d_model, n_head, lr = size
  config.model.n_layer, config.model.d_model, config.model.n_head = n_layer, d_model, n_head
  base.paper_run(config, vocab_size=50277, tokenizer="gpt-neox", batch_size=2048, seq_len=2048,
                 learning_rate=lr, total_steps=25000, warmup_steps=375, beta2=0.98, weight_decay=0.05)
  return config
