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
See configs/lion_common.py for the sizes and recipes, and seqmodels/lion.py for the model.

Sizes (layers x d_model / heads, 512 learned positions). `base` and `large` use the shipped
GPT-NeoX tokenizer (50277 tokens and the mask token, padded to 50280); with BERT's 30522-token
WordPiece vocabulary (padded to 30528) the same models would have BERT's size (released BERT:
109.48M and 335.14M, rounded in its paper to 110M and 340M):

  tiny:   4 x 128 / 4     0.91M (byte tokenizer: 257 tokens and the mask token)
  base:  12 x 768 / 12    124.77M  (109.60M with BERT's vocabulary)
  large: 24 x 1024 / 16   355.77M  (335.54M with BERT's vocabulary)

  python train.py --config configs/lion_s.py:base --config.data.train_files=/data/c4/*.jsonl \
      --workdir runs/lion_s_base
"""

from configs import lion_common

VARIANTS = dict.fromkeys(lion_common.VARIANT_NAMES)


def get_config(arg=None):
  return lion_common.get_config("lion_s", arg, __file__)
