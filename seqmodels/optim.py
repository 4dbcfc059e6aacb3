"""AdamW with global-norm clipping and a warmup-cosine schedule.

Weight decay applies to matrices only: embeddings and projection kernels. Norm scales, biases and
parameters typed `NoWeightDecay` (Mamba's A_log and D) are never decayed.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from seqmodels.layers import NoWeightDecay


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine down to min_lr_ratio * learning_rate."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.min_lr_ratio,
  )


def weight_decay_mask(params: nnx.State):
  def decayed(variable):
    # A scanned layer stack (model.scan_layers) adds a leading layer axis that is no matrix dimension.
    rank = jnp.ndim(variable.get_value()) - bool(variable.get_metadata().get("stacked_layers"))
    return rank >= 2 and not isinstance(variable, NoWeightDecay)
  return jax.tree.map(decayed, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config, params: nnx.State) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2,
                  weight_decay=config.weight_decay, mask=weight_decay_mask(params)),
  )
