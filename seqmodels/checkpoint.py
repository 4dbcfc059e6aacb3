"""Run directories: the resolved config, and verified Orbax checkpoints of the train state and data iterator.

    <workdir>/config.json                                 the resolved config of the run
    <workdir>/checkpoints/<step>/{state,data}             the checkpoint of a step
    <workdir>/checkpoints/<step>/seqmodels_manifest.json  size and sha256 of each of its files, written last
    <workdir>/rejected_checkpoints/<step>                 checkpoints found unusable at resume, kept to inspect

`state` holds the step, parameters and optimizer state; `data` the grain iterator's position, so a
resumed run sees exactly the batches an uninterrupted one would.

When a checkpoint counts: Orbax writes it into <step>.orbax-checkpoint-tmp and renames that to
<step> once every file is written, so a killed write never shows up as a step (its leftovers are
removed at the next start). Orbax checks no contents, though, so we then hash every file and write
the manifest last, atomically; a checkpoint is complete only when its manifest is there, and at
restore it must verify. That catches truncated files, flipped bytes and missing items, and a kill
between Orbax's rename and the manifest. Retention is ours rather than Orbax's max_to_keep: old
checkpoints are deleted only after a newer one's manifest is written, so the last good checkpoint
is never deleted before its successor is complete.
"""

import hashlib
import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from seqmodels import config as config_lib
from seqmodels import faults
from seqmodels.errors import UserError
from seqmodels.paths import safe_join

MANIFEST = "seqmodels_manifest.json"
# Keys that change how a run is watched, saved or laid out on devices, not what it computes: a
# resume may change them freely. Any other difference needs --override_config.
RESUMABLE_KEYS = ("log_every", "val_every", "val_batches", "checkpoint_every", "keep_checkpoints", "eval_tasks",
                  "eval_every", "eval_limit", "eval_data_dir", "mesh", "nonfinite_policy", "max_nonfinite_steps",
                  "command_buffers")


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


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


def _saved_config(workdir: str) -> dict | None:
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); restore it or use a new --workdir") from None


def check_same_model(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another architecture or shape."""
  saved = _saved_config(workdir)
  if saved is None:
    return
  saved = saved.get("model", {})
  wanted = json.loads(config_lib.to_json(config))["model"]
  diffs = [f"model.{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here"
           for k in sorted((set(saved) | set(wanted)) - LAYOUT_FREE_KEYS) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise UserError(f"--workdir {workdir} holds a checkpoint of another model ({'; '.join(diffs)}); "
                    "use a new --workdir or the config it was trained with")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_same_run(workdir: str, config, override: bool) -> list[str]:
  """The differences between `config` and the one saved in `workdir`, outside RESUMABLE_KEYS.

  Raises UserError when there are any and `override` is False. A key only one side has is left
  out: it was added to or removed from the code since, and takes its default.
  """
  saved = _saved_config(workdir)
  if saved is None:
    return []
  saved, wanted = _flatten(saved), _flatten(json.loads(config_lib.to_json(config)))
  diffs = [f"{k}: {saved[k]!r} there, {wanted[k]!r} here" for k in sorted(set(saved) & set(wanted))
           if k.split(".")[0] not in RESUMABLE_KEYS and saved[k] != wanted[k]]
  if diffs and not override:
    raise UserError(f"--workdir {workdir} holds a run with another config ({'; '.join(diffs)}); rerun with the "
                    "config it was trained with, use a new --workdir, or pass --override_config to continue it "
                    "with this one")
  return diffs


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str) -> None:
  """Records the size and sha256 of every file under step_dir in its manifest, atomically."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if not relative.startswith(MANIFEST):
        files[relative] = {"bytes": os.path.getsize(path), "sha256": _digest(path)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """Why the checkpoint in step_dir is not complete and intact, or None if it is."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return "it has no manifest, so its write never completed"
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    return f"its manifest is unreadable ({type(e).__name__})"
  if not isinstance(files, dict) or not files:
    return "its manifest lists no files"
  for name, entry in sorted(files.items()):
    try:
      path = safe_join(step_dir, name, what="manifest entry")
    except UserError as e:
      return str(e)
    if not os.path.isfile(path):
      return f"{name} is missing"
    size = os.path.getsize(path)
    if not isinstance(entry, dict) or size != entry.get("bytes"):
      return f"{name} has {size} bytes, the manifest says {entry.get('bytes') if isinstance(entry, dict) else '?'}"
    if _digest(path) != entry.get("sha256"):
      return f"{name} does not match its checksum"
  return None


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines()[0][:300] if text else type(e).__name__)


class Checkpointer:
  """Async Orbax checkpoints under <workdir>/checkpoints with manifests, keeping the last `keep` complete ones.

  A save returns once the arrays are copied off the devices and writes in the background; `poll`
  (cheap, once a step) or the next save or `close` finishes it: the manifest, then pruning.
  """

  def __init__(self, workdir: str, keep: int):
    faults.install_write_faults()
    self.workdir = workdir
    self.keep = keep
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._writing = None  # The step whose background write has not been finished yet.
    self._failed = False

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def complete_steps(self) -> list[int]:
    """Steps whose manifest has been written, oldest first (not re-verified: see `verify`)."""
    return [s for s in sorted(self.manager.all_steps()) if os.path.isfile(os.path.join(self.step_dir(s), MANIFEST))]

  def latest_step(self):
    """The newest complete step, or the step being written if newer; None if there is neither."""
    return max(self.complete_steps() + ([self._writing] if self._writing is not None else []), default=None)

  def save(self, step: int, state, data_iterator) -> None:
    self.finish_write()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
    except Exception as e:  # Orbax and TensorStore raise several types for a failed write.
      raise self._write_failed(step, e) from None
    self._writing = step

  def poll(self) -> None:
    """Finishes a background write that is done; does nothing otherwise."""
    if self._writing is not None and not self.manager.is_saving_in_progress():
      self.finish_write()

  def finish_write(self) -> None:
    """Waits for the background write, then writes its manifest and deletes checkpoints beyond `keep`."""
    if self._writing is None:
      return
    step, self._writing = self._writing, None
    try:
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(self.step_dir(step))
        self._prune()
    except Exception as e:
      raise self._write_failed(step, e) from None

  def _write_failed(self, step: int, error: Exception) -> CheckpointWriteError:
    self._failed = True
    complete = self.complete_steps()
    kept = (f"the last complete checkpoint {self.step_dir(complete[-1])} is intact" if complete
            else "there is no earlier checkpoint")
    return CheckpointWriteError(f"writing checkpoint {self.step_dir(step)} failed ({_first_line(error)}); {kept}; "
                                "free disk space or fix the file system, then rerun to resume")

  def _prune(self) -> None:
    complete = self.complete_steps()
    if len(complete) <= self.keep:
      return
    oldest_kept = complete[-self.keep]
    for step in self.manager.all_steps():
      if step < oldest_kept:
        manifest = os.path.join(self.step_dir(step), MANIFEST)
        if os.path.exists(manifest):
          # First, so a kill during the deletion leaves an incomplete checkpoint, never a damaged complete one.
          os.remove(manifest)
        self.manager.delete(step)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores `state` (shaped and sharded like abstract_state) and, if given, the iterator in place.

    Raises UserError if the checkpoint is incomplete or corrupt, or holds another model.
    """
    reason = verify(self.step_dir(step))
    if reason is not None:
      raise UserError(f"checkpoint {self.step_dir(step)} is unusable: {reason}; use another --step or rerun "
                      "train.py to resume from an earlier checkpoint")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise several types for a mismatched or bad checkpoint.
      detail = str(e).strip()
      first_line = detail.splitlines()[0].split(". ")[0] if detail else type(e).__name__
      raise UserError(f"checkpoint {self.step_dir(step)} could not be restored into this model ({first_line}); "
                      "if the model config changed, use a new --workdir or the config it was trained with") from None
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator, log) -> tuple[int | None, object]:
    """(step, state) of the newest checkpoint that verifies and restores, or (None, None) if there is none.

    Newer checkpoints that fail are logged with the reason and moved to <workdir>/rejected_checkpoints,
    so the run falls back to the previous good one. If the failures include one that verified but
    did not fit the model and no checkpoint restores, the config changed: that error is raised and
    nothing is moved.
    """
    rejected, mismatch = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = verify(self.step_dir(step))
      if reason is None:
        try:
          state = self.restore(step, abstract_state, data_iterator)
        except UserError as e:
          mismatch = mismatch or e
          reason = str(e)
      if reason is None:
        self._reject(rejected, log)
        if rejected:
          log(f"resuming from the previous good checkpoint {self.step_dir(step)}")
        return step, state
      rejected.append((step, reason))
    if mismatch is not None:
      raise mismatch
    self._reject(rejected, log)
    if rejected:
      log("no usable checkpoint is left; starting from step 0")
    return None, None

  def _reject(self, rejected, log) -> None:
    if not rejected or jax.process_index() != 0:
      return
    destination_root = os.path.join(self.workdir, "rejected_checkpoints")
    os.makedirs(destination_root, exist_ok=True)
    for step, reason in rejected:
      destination = os.path.join(destination_root, str(step))
      suffix = 1
      while os.path.exists(destination):
        destination, suffix = os.path.join(destination_root, f"{step}-{suffix}"), suffix + 1
      os.rename(self.step_dir(step), destination)
      log(f"checkpoint {self.step_dir(step)} is unusable ({reason}); moved it to {destination}")
    self.manager.reload()

  def wait(self) -> None:
    self.finish_write()

  def close(self) -> None:
    """Finishes the background write, if any; after a failed write only releases Orbax's resources."""
    try:
      if not self._failed:
        self.finish_write()
    finally:
      try:
        self.manager.close()
      except Exception:  # The failed write, reported already.
        if not self._failed:
          raise
