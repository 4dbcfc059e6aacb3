"""Training metrics: one JSON object per logged step in <workdir>/metrics.jsonl, and TensorBoard."""

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for key, value in metrics.items():
      self.tensorboard.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
