"""Run directories: the resolved config, and Orbax checkpoints of the train state and data iterator.

    <workdir>/config.json        the resolved config of the run
    <workdir>/checkpoints/<step>/{state,data}

`state` holds the step, parameters and optimizer state; `data` the grain iterator's position, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

import json
import os

import grain
import orbax.checkpoint as ocp

from seqmodels import config as config_lib
from seqmodels.errors import UserError


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def write_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = config_path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, config_path(workdir))  # Atomic: a kill never leaves half a config.


def read_config(workdir: str):
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise UserError(f"no config.json in --workdir {workdir}; point it at a directory written by train.py")
  return config_lib.from_json_file(path)


# Model keys that change how the step computes, not the parameters a checkpoint holds.
LAYOUT_FREE_KEYS = {"remat"}


def check_same_model(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another architecture or shape."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f).get("model", {})
  wanted = json.loads(config_lib.to_json(config))["model"]
  diffs = [f"model.{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here"
           for k in sorted((set(saved) | set(wanted)) - LAYOUT_FREE_KEYS) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise UserError(f"--workdir {workdir} holds a checkpoint of another model ({'; '.join(diffs)}); "
                    "use a new --workdir or the config it was trained with")


class Checkpointer:
  """Async Orbax checkpoints under <workdir>/checkpoints, keeping the last `keep`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores `state` (shaped and sharded like abstract_state) and, if given, the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise several types for a mismatched or bad checkpoint.
      detail = str(e).strip()
      first_line = detail.splitlines()[0].split(". ")[0] if detail else type(e).__name__
      raise UserError(f"checkpoint {self.directory}/{step} could not be restored into this model ({first_line}); "
                      "if the model config changed, use a new --workdir or the config it was trained with") from None
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
