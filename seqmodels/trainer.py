"""The training loop: one jitted step over a device mesh, validation, metrics and checkpoints.

The train state is a plain pytree {"step", "params", "opt_state"}; the step function is pure, so
the same state and batches give bitwise the same result, and a resumed run equals an uninterrupted
one. SIGTERM and SIGINT finish the current step, save a checkpoint and return.
"""

import dataclasses
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from seqmodels import checkpoint, data, lm, optim, sharding
from seqmodels import config as config_lib
from seqmodels.errors import UserError
from seqmodels.metrics import MetricsWriter
from seqmodels.tokenizers import load_tokenizer


@dataclasses.dataclass
class TrainResult:
  step: int
  val_loss: float | None
  interrupted: bool  # Stopped by a signal, after saving a checkpoint.


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def describe(config) -> dict:
  """Parameter count and training flops per token, from shapes alone."""
  model = lm.abstract(config.model)
  return {"params": lm.count_params(model), "flops_per_token": lm.flops_per_token(model, config.seq_len)}


class Trainer:

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.graphdef, abstract_params = nnx.split(lm.abstract(config.model))
    self.tx = optim.make_optimizer(config, abstract_params)
    self.schedule = optim.learning_rate_schedule(config)
    self.mesh = sharding.make_mesh(config.mesh)
    if config.batch_size % sharding.batch_divisor(self.mesh):
      raise UserError(f"batch_size {config.batch_size} is not divisible by the {sharding.batch_divisor(self.mesh)} "
                      "devices on the mesh's batch axes; pick a multiple")
    replicated = sharding.replicated(self.mesh)
    self.abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                       jax.eval_shape(self._init_state))
    state_sharding = jax.tree.map(lambda x: x.sharding, self.abstract_state)
    batch_sharding = sharding.batch_sharding(self.mesh)
    self.init_state = jax.jit(self._init_state, out_shardings=state_sharding)
    self.train_step = jax.jit(self._train_step, in_shardings=(state_sharding, batch_sharding),
                              out_shardings=(state_sharding, replicated), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_loss, in_shardings=(state_sharding["params"], batch_sharding),
                             out_shardings=replicated)

  def _init_state(self):
    params = nnx.state(lm.build(self.config.model, self.config.seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def _eval_loss(self, params, batch):
    model = nnx.merge(self.graphdef, params)
    return cross_entropy(model(batch["inputs"]), batch["targets"])

  def _train_step(self, state, batch):
    loss, grads = jax.value_and_grad(self._eval_loss)(state["params"], batch)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  def validate(self, params, val_batches) -> float:
    losses = [self.eval_step(params, sharding.put_batch(b, self.mesh)) for b in val_batches]
    return float(np.mean(jax.device_get(losses)))


def train(config, workdir: str, *, max_steps: int | None = None, progress: bool = True) -> TrainResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps.

  `max_steps` stops this call after that many steps, with a checkpoint, as a preemption would.
  """
  cfg = config
  lm.check_config(cfg.model)
  checkpoint.check_same_model(workdir, cfg)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                    f"{cfg.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}")
  train_tokens, val_tokens = data.load_splits(cfg.data, tokenizer, seq_len=cfg.seq_len)
  val_batches = data.make_eval_batches(val_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                       max_batches=cfg.val_batches)
  trainer = Trainer(cfg, workdir)
  train_iter = data.make_train_iterator(train_tokens, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                                        seed=cfg.seed)
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    state, start = trainer.init_state(), 0
  else:
    state = ckpt.restore(start, trainer.abstract_state, train_iter)
  checkpoint.write_config(workdir, cfg)

  log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda _: None)
  if start == 0:
    log(f"train: {len(train_tokens):,} tokens (unigram entropy {data.unigram_entropy(train_tokens, tokenizer.vocab_size):.3f} "
        f"nats/token); val: {len(val_tokens):,} tokens; params: {describe(cfg)['params']:,}")
  else:
    log(f"resuming {workdir} from step {start}")

  stop_signal = []
  previous_handlers = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
                       for s in (signal.SIGTERM, signal.SIGINT)}
  metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  end = cfg.total_steps if max_steps is None else min(cfg.total_steps, start + max_steps)
  bar = tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
             mininterval=1.0)
  val_loss, step = None, start
  pending, interval_start = [], time.perf_counter()
  try:
    while step < end and not stop_signal:
      batch = sharding.put_batch(next(train_iter), trainer.mesh)
      state, step_metrics = trainer.train_step(state, batch)
      step += 1
      pending.append(step_metrics)
      bar.update(1)
      validate_now = step % cfg.val_every == 0 or step == cfg.total_steps
      if step % cfg.log_every == 0 or validate_now or step == end:
        fetched = jax.device_get(pending)
        elapsed = time.perf_counter() - interval_start
        record = {
            "loss": float(np.mean([m["loss"] for m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "lr": float(trainer.schedule(step - 1)),
            "tokens_per_sec": len(fetched) * cfg.batch_size * cfg.seq_len / elapsed,
        }
        if not math.isfinite(record["loss"]):
          raise FloatingPointError(f"loss is {record['loss']} at step {step}; lower learning_rate or check the data")
        if validate_now:
          val_loss = record["val_loss"] = trainer.validate(state["params"], val_batches)
        metrics.write(step, record)
        bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if k in record}, refresh=False)
        pending, interval_start = [], time.perf_counter()
      if step % cfg.checkpoint_every == 0 and step < end:
        ckpt.save(step, state, train_iter)
    if ckpt.latest_step() != step:
      ckpt.save(step, state, train_iter)
  finally:
    bar.close()
    ckpt.close()
    metrics.close()
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)
  if stop_signal:
    log(f"stopped by {signal.Signals(stop_signal[0]).name} at step {step}; checkpoint saved in {ckpt.directory}. "
        "Run the same command again to resume.")
  else:
    log(f"step {step}: val_loss {val_loss}" if val_loss is not None else f"step {step}")
  return TrainResult(step=step, val_loss=val_loss, interrupted=bool(stop_signal))


def resolved_config(config_spec: str, overrides):
  config, rest = config_lib.from_command_line(config_spec, overrides)
  if rest:
    raise UserError(f"unknown argument(s) {' '.join(rest)}; see --help")
  return config
