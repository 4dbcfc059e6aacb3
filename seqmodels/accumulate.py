"""Gradient accumulation: one update from a batch run as `config.microbatches` sequential pieces.

The loss is the mean over every scored position (or record) of the whole batch. Each microbatch's
summed loss is divided by the whole batch's count before differentiating, so the summed gradients
are exactly the whole batch's gradient (the token-count weighting is built in), and the update
equals the one from the undivided batch up to float32 summation order. Only one microbatch's
activations are alive at a time.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from seqmodels import sharding
from seqmodels.errors import UserError


def check_microbatches(batch_size: int, microbatches: int, batch_divisor: int) -> None:
  if microbatches < 1:
    raise UserError(f"microbatches must be >= 1, got {microbatches}")
  if batch_size % (microbatches * batch_divisor):
    raise UserError(f"batch_size {batch_size} does not split into {microbatches} microbatches of a multiple of "
                    f"the {batch_divisor} batch-sharded devices; pick a batch_size divisible by "
                    f"{microbatches * batch_divisor}")


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """Leading axis (batch, ...) -> (microbatches, batch / microbatches, ...).

  Microbatch i takes rows i, i + m, i + 2m, ...: every device's contiguous block of the batch then
  holds an equal share of every microbatch, so no rows move between devices.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(sums_fn, params, batch: dict, microbatches: int):
  """(mean loss, mean accuracy, gradient of the mean loss) over the batch's scored positions.

  sums_fn(params, batch) -> {"loss", "correct", "count"} sums; a batch's optional "weights" says
  which positions count (all of them without it).

  With several microbatches on a mesh that splits the batch over 'data', each data-parallel group
  accumulates the gradients of its own rows inside a shard_map and the groups' sums are added once
  at the end: one all-reduce a step, where under XLA's partitioning alone every microbatch's
  gradients would be all-reduced inside the loop (16 all-reduces a step for 16 microbatches).
  """
  targets = batch["targets"]
  count = jnp.sum(batch["weights"]) if "weights" in batch else jnp.asarray(targets.size, jnp.float32)
  count = jnp.maximum(count, 1.0)  # A masked-LM batch could, rarely, mask nothing.

  def share(params, piece, count):
    sums = sums_fn(params, piece)
    return sums["loss"] / count, sums["correct"] / count

  grad_fn = jax.value_and_grad(share, has_aux=True)
  if microbatches == 1:
    (loss, accuracy), grads = grad_fn(params, batch, count)
    return loss, accuracy, grads

  def accumulated(params, batch, count):
    def add(totals, piece):
      (loss, accuracy), grads = grad_fn(params, piece, count)
      return jax.tree.map(jnp.add, totals, (loss, accuracy, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    return jax.lax.scan(add, zeros, split_microbatches(batch, microbatches))[0]

  mesh = sharding.context_mesh()
  if not sharding.splits_data(mesh):
    return accumulated(params, batch, count)

  def group_sums(params, batch, count):
    return jax.lax.psum(accumulated(params, batch, count), "data")

  # check_vma=False: the sums start from plain zeros and become data-varying in the loop; the specs
  # say how everything is laid out (parameters whole within a group, the batch split). The mesh's
  # axes of size 1 are manual too: where no axis is left to partition, ops with a custom
  # partitioner (cuDNN's attention) are not handed a partly manual sharding, which its partitioner
  # rejects (jax 0.11.2, gpt-125m on 2 H200s).
  manual = {"data"} | {axis for axis, size in mesh.shape.items() if size == 1}
  return jax.shard_map(group_sums, in_specs=(P(), P("data"), P()), out_specs=P(), axis_names=manual,
                       check_vma=False)(params, batch, count)
