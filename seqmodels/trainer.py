"""The training loop: one jitted step over a device mesh, validation, metrics and checkpoints.

The train state is a plain pytree {"step", "params", "opt_state"}; the step function is pure, so
the same state and batches give bitwise the same result, and a resumed run equals an uninterrupted
one. SIGTERM and SIGINT finish the current step, save a checkpoint and return. A step with a
non-finite loss or gradient leaves the parameters and optimizer state as they were
(seqmodels/nonfinite.py says what happens next).
"""

import dataclasses
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from seqmodels import (accumulate, checkpoint, data, faults, layers, lion, lm, losses, nonfinite, optim, sharding,
                       throughput, zero_shot)
from seqmodels import config as config_lib
from seqmodels.errors import UserError
from seqmodels.metrics import MetricsWriter, check_wandb, peak_memory_gb
from seqmodels.tokenizers import load_tokenizer, mask_token_id

OBJECTIVES = ("causal_lm", "mlm", "classification")


@dataclasses.dataclass
class TrainResult:
  step: int
  val_loss: float | None
  interrupted: bool  # Stopped by a signal, after saving a checkpoint.
  val_accuracy: float | None = None  # Of the argmax prediction at each scored position (or record).


def check_objective(config) -> None:
  """Raises UserError for an objective the architecture cannot be trained on."""
  if config.objective not in OBJECTIVES:
    raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{config.objective}'")
  encoder = getattr(lm.backbone_class(config.model.architecture), "bidirectional", False)
  if encoder and config.objective == "causal_lm":
    raise UserError(f"{config.model.architecture} is a bidirectional encoder, which sees the token it would "
                    "predict; train it with --config.objective=mlm")
  if not encoder and config.objective != "causal_lm":
    encoders = [name for name, cls in lm.ARCHITECTURES.items() if getattr(cls, "bidirectional", False)]
    raise UserError(f"objective '{config.objective}' needs a bidirectional encoder ({', '.join(encoders)}), "
                    f"not {config.model.architecture}; use --config.objective=causal_lm")


def build_model(config) -> nnx.Module:
  """The language model, or for classification the same model inside a SequenceClassifier."""
  model = lm.build(config.model, config.seed)
  if config.objective != "classification":
    return model
  return lion.SequenceClassifier(model, config.num_classes, dtype=layers.compute_dtype(config.model.dtype),
                                 rngs=nnx.Rngs(params=config.seed + 1))


def describe(config) -> dict:
  """Parameter count and training flops per token, from shapes alone."""
  model = lm.abstract(config.model)
  return {"params": lm.count_params(model), "flops_per_token": lm.flops_per_token(model, config.seq_len)}


COMMAND_BUFFERS = ("auto", "on", "off")  # configs/base.py's command_buffers.


def step_compiler_options(config) -> dict:
  """XLA's options for the train and eval steps: command buffers as configs/base.py's command_buffers says."""
  setting = config.get("command_buffers", "auto")
  if setting not in COMMAND_BUFFERS:
    raise UserError(f"command_buffers must be {', '.join(COMMAND_BUFFERS[:-1])} or {COMMAND_BUFFERS[-1]}, got "
                    f"'{setting}'; pass --config.command_buffers=auto")
  if setting == "auto":
    setting = "on" if config.model.scan_layers else "off"
  return {} if setting == "on" else {"xla_gpu_enable_command_buffer": ""}


class Trainer:

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config)))
    self.tx = optim.make_optimizer(config, abstract_params)
    self.schedule = optim.learning_rate_schedule(config)
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_mesh(config, self.mesh)
    accumulate.check_microbatches(config.batch_size, config.get("microbatches", 1), sharding.batch_divisor(self.mesh))
    replicated = sharding.replicated(self.mesh)
    self.abstract_state = sharding.place(jax.eval_shape(self._init_state), self.mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, self.abstract_state)
    batch_sharding = sharding.batch_sharding(self.mesh)
    options = step_compiler_options(config)
    self.init_state = sharding.jit(self.mesh, self._init_state, out_shardings=state_sharding)
    self.train_step = sharding.jit(self.mesh, self._train_step, in_shardings=(state_sharding, batch_sharding),
                                   out_shardings=(state_sharding, replicated), donate_argnums=0,
                                   compiler_options=options)
    self.eval_step = sharding.jit(self.mesh, self._sums, in_shardings=(state_sharding["params"], batch_sharding),
                                  out_shardings=replicated, compiler_options=options)

  def _init_state(self):
    params = nnx.state(build_model(self.config))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def _sums(self, params, batch):
    """Summed loss and correct argmax predictions over a batch's scored positions, and their count.

    A batch's optional "weights" says which positions (mlm: the masked tokens) or records
    (classification) are scored; without it every target is.
    """
    model = nnx.merge(self.graphdef, params)
    if self.config.objective == "classification":
      logits = model(batch["inputs"], batch["mask"])
    else:
      logits = model.training_logits(batch["inputs"])
    targets = batch["targets"]
    weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    nll = losses.cross_entropy(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    return {"loss": jnp.sum(nll * weights), "correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}

  def _train_step(self, state, batch):
    factor = faults.nonfinite_factor(state["step"])  # 1.0 unless a fault is injected.

    def sums(params, piece):
      piece_sums = self._sums(params, piece)
      return {**piece_sums, "loss": piece_sums["loss"] * factor}

    loss, accuracy, grads = accumulate.loss_and_grads(sums, state["params"], batch, self.config.get("microbatches", 1))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = nonfinite.keep_if_finite(finite, (params, opt_state), (state["params"], state["opt_state"]))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "nonfinite": ~finite}

  def validate(self, params, val_batches) -> dict:
    """val_loss and val_accuracy over all scored positions (or records) of the validation batches."""
    sums = jax.device_get([self.eval_step(params, sharding.put_global_batch(b, self.mesh)) for b in val_batches])
    count = sum(float(s["count"]) for s in sums)
    return {"val_loss": sum(float(s["loss"]) for s in sums) / count,
            "val_accuracy": sum(float(s["correct"]) for s in sums) / count}

  def load_encoder(self, state, init_from: str):
    """`state` with its classifier's encoder replaced by the latest parameters of the run in `init_from`."""
    source = Trainer(checkpoint.read_config(init_from), init_from)
    ckpt = checkpoint.Checkpointer(init_from, keep=source.config.keep_checkpoints)
    try:
      step = ckpt.latest_step()
      if step is None:
        raise UserError(f"init_from: no checkpoint in {ckpt.directory}; train the MLM run first")
      encoder = ckpt.restore(step, source.abstract_state)["params"]
    finally:
      ckpt.close()
    if not _same_shapes(encoder, state["params"]["encoder"]):
      raise UserError(f"init_from {init_from} holds another model ({source.config.model.architecture}, "
                      f"d_model {source.config.model.d_model}, n_layer {source.config.model.n_layer}); "
                      "fine-tune with the model.* keys it was trained with")
    state["params"]["encoder"] = jax.device_put(encoder, jax.tree.map(lambda x: x.sharding, state["params"]["encoder"]))
    return state


def utilization(tokens_per_sec: float, flops_per_token: float, mesh) -> dict:
  """{"mfu": model FLOPs utilization} (seqmodels/throughput.py), or {} on devices of unknown peak."""
  mfu = throughput.mfu(tokens_per_sec / mesh.size, flops_per_token, mesh.devices.flat[0])
  return {} if mfu is None else {"mfu": mfu}


def _same_shapes(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train(config, workdir: str, *, max_steps: int | None = None, progress: bool = True,
          override_config: bool = False) -> TrainResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps.

  `max_steps` stops this call after that many steps, with a checkpoint, as a preemption would.
  `override_config` resumes a workdir whose saved config differs from `config` (the model must match).
  """
  cfg = config
  sharding.initialize_distributed(cfg.distributed)
  lm.check_config(cfg.model)
  if cfg.model.position_embedding == "learned" and cfg.seq_len > cfg.model.max_positions:
    raise UserError(f"seq_len {cfg.seq_len} exceeds model.max_positions {cfg.model.max_positions} of the learned "
                    f"position table; lower --config.seq_len or raise --config.model.max_positions")
  check_objective(cfg)
  check_wandb(cfg.wandb)
  config_lib.check_training(cfg, jax.device_count())
  trainer = Trainer(cfg, workdir)
  checkpoint.check_same_model(workdir, cfg)
  overridden = checkpoint.check_same_run(workdir, cfg, override_config)
  log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda _: None)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  # A process reads the batch rows its devices hold; processes sharing rows read the same ones.
  reader = dict(zip(("process_index", "process_count"), sharding.process_batch_slice(trainer.mesh)))
  # A masked LM adds the mask token, id tokenizer.vocab_size, after the tokenizer's own.
  needed = tokenizer.vocab_size + (cfg.objective == "mlm")
  if needed > cfg.model.vocab_size:
    mask = f" and objective 'mlm' adds the mask token (id {mask_token_id(tokenizer)})" if cfg.objective == "mlm" else ""
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens{mask} but model.vocab_size is "
                    f"{cfg.model.vocab_size}; set --config.model.vocab_size={needed}")
  if cfg.objective == "classification":
    train_examples, val_examples = data.load_classification(cfg.data, tokenizer, seq_len=cfg.seq_len,
                                                            num_classes=cfg.num_classes)
    val_batches = data.make_example_batches(val_examples, batch_size=cfg.batch_size)
    train_iter = data.make_example_iterator(train_examples, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                            **reader)
    majority = np.bincount(val_examples.arrays["targets"]).max() / len(val_examples)
    summary = (f"train: {len(train_examples):,} records; val: {len(val_examples):,} records (majority class "
               f"{majority:.1%})")
  else:
    mlm = None
    if cfg.objective == "mlm":
      mlm = data.MaskedLM(mask_id=mask_token_id(tokenizer), vocab_size=tokenizer.vocab_size,
                          rate=cfg.data.mask_rate)
    data_report = data.DataReport()
    train_tokens, val_tokens = data.load_splits(cfg.data, tokenizer, seq_len=cfg.seq_len, report=data_report)
    for line in data_report.lines():
      log(line)
    val_batches = data.make_eval_batches(val_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                         max_batches=cfg.val_batches, mlm=mlm, seed=cfg.seed)
    train_iter = data.make_train_iterator(train_tokens, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                                          seed=cfg.seed, mlm=mlm, **reader)
    summary = (f"train: {len(train_tokens):,} tokens (unigram entropy "
               f"{data.unigram_entropy(train_tokens, tokenizer.vocab_size):.3f} nats/token); "
               f"val: {len(val_tokens):,} tokens")
  eval_tasks = {}
  if cfg.eval_every and cfg.eval_tasks:
    zero_shot.check_causal(cfg.model)
    eval_tasks = zero_shot.load_tasks(cfg.eval_tasks, cfg.eval_data_dir, cfg.eval_limit)
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  start, state = ckpt.restore_latest(trainer.abstract_state, train_iter, log)
  if start is None:
    state, start = trainer.init_state(), 0
    if cfg.init_from:
      state = trainer.load_encoder(state, cfg.init_from)
  checkpoint.write_config(workdir, cfg)

  stats = describe(cfg)
  if overridden:
    log(f"--override_config: continuing {workdir} with {'; '.join(overridden)}")
  if start == 0:
    log(f"{summary}; params: {stats['params']:,}")
  else:
    log(f"resuming {workdir} from step {start}")

  stop_signal = []
  previous_handlers = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
                       for s in (signal.SIGTERM, signal.SIGINT)}
  metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0, config=cfg)
  end = cfg.total_steps if max_steps is None else min(cfg.total_steps, start + max_steps)
  bar = tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
             mininterval=1.0)
  guard = nonfinite.NonfiniteGuard(cfg.nonfinite_policy, cfg.max_nonfinite_steps)
  last_checkpoint = lambda: None if ckpt.latest_step() is None else ckpt.step_dir(ckpt.latest_step())
  val_metrics, step = {}, start
  pending, fetched, interval_start = [], [], time.perf_counter()

  def fetch(last_step):
    """Waits for the pending steps' metrics, the last of them step `last_step`, and checks them."""
    nonlocal pending, fetched
    newly = jax.device_get(pending)
    guard.observe([m["nonfinite"] for m in newly], last_step - len(newly) + 1, last_checkpoint())
    fetched, pending = fetched + newly, []

  def write_record(at_step, validate_now=False, eval_now=False):
    """Writes the record of the steps fetched since the last one, ending at `at_step`."""
    nonlocal fetched, interval_start, val_metrics
    elapsed = time.perf_counter() - interval_start
    finite = [m for m in fetched if not m["nonfinite"]] or fetched
    record = {
        "loss": float(np.mean([m["loss"] for m in finite])),
        "accuracy": float(np.mean([m["accuracy"] for m in finite])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in finite])),
        "lr": float(trainer.schedule(at_step - 1)),
        "tokens_per_sec": len(fetched) * cfg.batch_size * cfg.seq_len / elapsed,
        "nonfinite_steps": sum(bool(m["nonfinite"]) for m in fetched),
    }
    record.update(utilization(record["tokens_per_sec"], stats["flops_per_token"], trainer.mesh))
    peak = peak_memory_gb()
    if peak is not None:
      record["peak_memory_gb"] = peak
    if validate_now:
      val_metrics = trainer.validate(state["params"], val_batches)
      record.update(val_metrics)
    if eval_now:
      scores = zero_shot.evaluate(nnx.merge(trainer.graphdef, state["params"]), cfg.model, tokenizer, eval_tasks,
                                  batch_size=cfg.batch_size, progress=False)
      record.update({f"eval/{task}/{k}": v for task, r in scores.items() for k, v in r.items() if k != "n"})
    metrics.write(at_step, record)
    bar.set_postfix({**{k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if k in record},
                     "tok/s": f"{record['tokens_per_sec']:,.0f}",
                     **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})}, refresh=False)
    fetched, interval_start = [], time.perf_counter()

  log_after_next_dispatch = False
  batches = data.Prefetcher(train_iter, lambda batch: sharding.put_batch(batch, trainer.mesh))
  try:
    while step < end and not stop_signal:
      batch = next(batches)
      state, step_metrics = trainer.train_step(state, batch)
      if log_after_next_dispatch:  # The previous step's log, written while this step runs.
        fetch(step)
        write_record(step)
        log_after_next_dispatch = False
      step += 1
      pending.append(step_metrics)
      bar.update(1)
      ckpt.poll()
      validate_now = step % cfg.val_every == 0 or step == cfg.total_steps
      eval_now = bool(eval_tasks) and step % cfg.eval_every == 0
      save_now = step % cfg.checkpoint_every == 0 and step < end
      log_now = step % cfg.log_every == 0 or validate_now or eval_now or step == end
      if log_now and not (validate_now or eval_now or save_now or stop_signal or step == end):
        # Waiting for this step here would leave the device idle while the host logs and
        # dispatches the next step, which needs neither this step's metrics nor its state.
        log_after_next_dispatch = True
        continue
      # Also before every checkpoint and stop, so that no non-finite step goes unseen into a checkpoint.
      if log_now or save_now or stop_signal:
        fetch(step)
      if log_now:
        write_record(step, validate_now, eval_now)
      if save_now:
        batches.rewind()
        ckpt.save(step, state, train_iter)
    if log_after_next_dispatch:
      fetch(step)
      write_record(step)
    if ckpt.latest_step() != step:
      fetch(step)
      batches.rewind()
      ckpt.save(step, state, train_iter)
  finally:
    batches.close()
    bar.close()
    ckpt.close()
    metrics.close()
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)
  if stop_signal:
    log(f"stopped by {signal.Signals(stop_signal[0]).name} at step {step}; checkpoint saved in {ckpt.directory}. "
        "Run the same command again to resume.")
  else:
    log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()) if val_metrics
        else f"step {step}")
  return TrainResult(step=step, val_loss=val_metrics.get("val_loss"), interrupted=bool(stop_signal),
                     val_accuracy=val_metrics.get("val_accuracy"))


def resolved_config(config_spec: str, overrides):
  config, rest = config_lib.from_command_line(config_spec, overrides)
  if rest:
    raise UserError(f"unknown argument(s) {' '.join(rest)}; see --help")
  return config
