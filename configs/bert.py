"""BERT (Devlin et al., 2019): the LION encoder of configs/lion_common.py with softmax attention.

The baseline the LION paper measures its MLM accuracy, BoolQ accuracy and training time against:
same sizes, recipe and variants as configs/lion_lit.py (`tiny`, `base`, `large` and their `_boolq`
fine-tuning), with parameters equal to LION-LIT's.

  python train.py --config configs/bert.py:tiny                # MLM pretraining -> runs/bert_tiny
  python train.py --config configs/bert.py:tiny_boolq          # BoolQ from runs/bert_tiny
"""

from configs import lion_common

VARIANTS = dict.fromkeys(lion_common.VARIANT_NAMES)


def get_config(arg=None):
  return lion_common.get_config("bert", arg, __file__)
