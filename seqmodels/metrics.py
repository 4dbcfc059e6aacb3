"""Training metrics: one JSON object per logged step in <workdir>/metrics.jsonl, TensorBoard, and
optionally Weights & Biases (config.wandb.enabled, with wandb installed)."""

import json
import os

import jax
from tensorboardX import SummaryWriter

from seqmodels.errors import UserError


def check_wandb(wandb_config) -> None:
  """Raises UserError when W&B logging is asked for but wandb is not installed."""
  if wandb_config.enabled:
    _import_wandb()


def _import_wandb():
  try:
    import wandb
  except ImportError:
    raise UserError("config.wandb.enabled is true but wandb is not installed; pip install wandb, "
                    "or set --config.wandb.enabled=false") from None
  return wandb


def _start_wandb(wandb_config, workdir: str, run_config):
  """A W&B run named after the workdir, grouped by its parent folder (a sweep's name); resumed by id."""
  wandb = _import_wandb()
  id_path = os.path.join(workdir, "wandb_id")
  if os.path.isfile(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = wandb.util.generate_id()
    with open(id_path, "w") as f:
      f.write(run_id)
  workdir = os.path.abspath(workdir)
  return wandb.init(project=wandb_config.project, group=wandb_config.group or os.path.basename(os.path.dirname(workdir)),
                    name=os.path.basename(workdir), id=run_id, resume="allow", dir=workdir,
                    config=run_config.to_dict())


def peak_memory_gb() -> float | None:
  """The first local device's peak allocated memory in GB, where the backend reports it (GPU, TPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool = True, config=None):
    """`config` (the run's) turns on W&B logging when config.wandb.enabled."""
    self.enabled = enabled
    self.wandb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
      if config is not None and config.wandb.enabled:
        self.wandb = _start_wandb(config.wandb, workdir, config)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for key, value in metrics.items():
      self.tensorboard.add_scalar(key, float(value), int(step))
    if self.wandb is not None:
      self.wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
      if self.wandb is not None:
        self.wandb.finish()
