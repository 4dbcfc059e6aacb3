"""LION-D: bidirectional linear attention with a learned decay per head, M_ij = sigmoid(a_h)^|i-j|
(RetNet's decay, made bidirectional), in BERT's encoder.

Masked-LM pretraining, then BoolQ fine-tuning from its checkpoint (first variant is the default):

  python train.py --config configs/lion_d.py:tiny                # -> runs/lion_d_tiny
  python train.py --config configs/lion_d.py:tiny_boolq          # encoder from runs/lion_d_tiny

`--config.model.lion_form=chunked` (or `rnn`) runs the same weights through the other forms.
See configs/lion_common.py for the sizes and recipes, and seqmodels/lion.py for the model.

Sizes (layers x d_model / heads, 512 learned positions). `base` and `large` use the shipped
GPT-NeoX tokenizer (50277 tokens and the mask token, padded to 50280); with BERT's 30522-token
WordPiece vocabulary (padded to 30528) the same models would have BERT's size (released BERT:
109.48M and 335.14M, rounded in its paper to 110M and 340M):

  tiny:   4 x 128 / 4     0.91M (byte tokenizer: 257 tokens and the mask token)
  base:  12 x 768 / 12    124.66M  (109.49M with BERT's vocabulary)
  large: 24 x 1024 / 16   355.37M  (335.15M with BERT's vocabulary)

  python train.py --config configs/lion_d.py:base --config.data.train_files=/data/c4/*.jsonl \
      --workdir runs/lion_d_base
"""

from configs import lion_common

VARIANTS = dict.fromkeys(lion_common.VARIANT_NAMES)


def get_config(arg=None):
  return lion_common.get_config("lion_d", arg, __file__)
