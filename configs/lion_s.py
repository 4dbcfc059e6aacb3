"""LION-S: bidirectional linear attention with a selective decay per token and head,
lambda_t = 1 - sigmoid(W_a x_t + b) (Mamba-style selectivity), in BERT's encoder.

Masked-LM pretraining, then BoolQ fine-tuning from its checkpoint (first variant is the default):

  python train.py --config configs/lion_s.py:tiny                # -> runs/lion_s_tiny
  python train.py --config configs/lion_s.py:tiny_boolq          # encoder from runs/lion_s_tiny

Measured on a shared 2-core CPU: `tiny` reaches a masked-byte validation loss of 1.66 nats and 51.8%
accuracy at step 600 (5 minutes); `tiny_boolq` from it ends at 63.0% held-out accuracy (26
minutes), exactly the majority baseline of the held-out records (63.0% "yes"; 62.2% over the whole
file): a 0.9M-parameter byte-level encoder learns only the label prior.

`--config.model.lion_form=chunked` (or `rnn`) runs the same weights through the other forms.
Sizes, parameter counts and recipes: configs/lion_common.py; the model: seqmodels/lion.py.

  python train.py --config configs/lion_s.py:base --config.data.train_files=/data/c4/*.jsonl \
      --workdir runs/lion_s_base
"""

from configs import lion_common

VARIANTS = dict.fromkeys(lion_common.VARIANT_NAMES)


def get_config(arg=None):
  return lion_common.get_config("lion_s", arg, __file__)