"""LION-D: bidirectional linear attention with a learned decay per head, M_ij = sigmoid(a_h)^|i-j|
(RetNet's decay, made bidirectional), in BERT's encoder.

Masked-LM pretraining, then BoolQ fine-tuning from its checkpoint (first variant is the default):

  python train.py --config configs/lion_d.py:tiny                # -> runs/lion_d_tiny
  python train.py --config configs/lion_d.py:tiny_boolq          # encoder from runs/lion_d_tiny

`--config.model.lion_form=chunked` (or `rnn`) runs the same weights through the other forms.
Sizes, parameter counts and recipes: configs/lion_common.py; the model: seqmodels/lion.py.

  python train.py --config configs/lion_d.py:base --config.data.train_files=/data/c4/*.jsonl \
      --workdir runs/lion_d_base
"""

from configs import lion_common

VARIANTS = dict.fromkeys(lion_common.VARIANT_NAMES)


def get_config(arg=None):
  return lion_common.get_config("lion_d", arg, __file__)