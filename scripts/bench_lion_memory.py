"""Inference memory of LION's three forms against sequence length, from XLA's compiled buffers.

  python scripts/bench_lion_memory.py [--variant lion_s] [--lengths 256,512,1024,2048,4096,8192]

Compiles the forward of one LION attention layer at BERT-base width (d_model 768, 12 heads, batch
1) in each form and prints the temporary bytes XLA allocates for it
(`jax.jit(f).lower(...).compile().memory_analysis()`): nothing runs, so it works on a CPU in seconds.
The full form holds the (heads, L, L) attention matrix, so its memory grows as L^2; the RNN form
holds one (dk, dv + 1) state per head and direction, so its memory grows only with the L x d
inputs and outputs; the chunked form holds an L x chunk block.

Measured on CPU (jax 0.11.2, this command's output):

  lion_s, temp MiB:

         L       full    chunked        rnn
       256        6.8        6.8       11.0
       512       25.5       12.1       17.0
      1024       99.1       24.1       33.7
      2048      390.2       48.3       67.0
      4096     1548.4       96.6      133.7
      8192     6168.8      193.2      267.0

From 256 to 8192 tokens (32x) the full form's memory grows 907x (about 32^2 = 1024x) and the RNN
form's 24x, linearly (about 2x per doubling, plus a constant); at 8192 tokens the full form needs
23x the RNN form's memory.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import lion_common  # noqa: E402
from seqmodels import lion  # noqa: E402


def temp_bytes(variant: str, form: str, length: int, *, d_model: int = 768, n_head: int = 12,
               chunk_size: int = 64) -> int:
  """XLA's temporary bytes for one LION attention layer's forward over (1, length, d_model)."""
  cfg = lion_common.lion_model(variant)
  cfg.d_model, cfg.n_head, cfg.n_layer = d_model, n_head, 1
  cfg.lion_form, cfg.chunk_size = form, chunk_size
  graphdef, state = nnx.split(nnx.eval_shape(lambda: lion.LionAttention(cfg, dtype=jnp.float32,
                                                                        rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, length, d_model), jnp.float32)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return forward.lower(state, x).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="lion_s", choices=lion.LION_VARIANTS)
  parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
  args = parser.parse_args()
  print(f"{args.variant}, temp MiB:\n\n{'L':>8} {'full':>10} {'chunked':>10} {'rnn':>10}")
  for length in map(int, args.lengths.split(",")):
    row = [temp_bytes(args.variant, form, length) / 2**20 for form in lion.LION_FORMS]
    print(f"{length:>8} " + " ".join(f"{mib:>10.1f}" for mib in row))


if __name__ == "__main__":
  main()
