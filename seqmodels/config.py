"""Config files and command-line overrides.

A config file is a Python module with `get_config(arg)` returning an `ml_collections.ConfigDict`
(the big_vision convention). It is named on the command line as `path/to/file.py[:arg]`, and any key
can be overridden with `--config.key=value` or `--config.a.b value`. Overrides keep the key's type;
an unknown key, a wrong type or an unknown variant is a one-line `UserError`.
"""

import ast
import difflib
import importlib.util
import json
import math
import os

import ml_collections

from seqmodels.errors import UserError


def call_python_file(spec: str, function: str, kind: str, usage: str, returns: str):
  """Runs `path.py[:arg]`'s `function(arg)` (arg None when absent): how config and sweep files load.

  kind names the file in errors ("config file"), usage says how to pass one, returns what
  `function` must return.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"{kind} '{path}' not found; pass {usage}")
  module_spec = importlib.util.spec_from_file_location(f"_seqmodels_{function}_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise UserError(f"{kind} '{path}' defines no {function}(arg); add one returning {returns}")
  return getattr(module, function)(arg or None)


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling the module's get_config(arg)."""
  return call_python_file(spec, "get_config", "config file", "--config configs/<arch>.py:<variant>", "a ConfigDict")


def select_variant(variants: dict, arg, path: str):
  """The variant `arg` of a config file (its first variant when arg is None), or a UserError."""
  if arg is None:
    arg = next(iter(variants))
  if arg not in variants:
    raise UserError(f"unknown variant '{arg}' in {path}; known: {', '.join(variants)}")
  return arg, variants[arg]


def split_override_args(argv):
  """Splits ['--config.a=1', '--config.b', '2', '--x'] into ([('a', '1'), ('b', '2')], ['--x'])."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UserError(f"{arg} has no value; write {arg}=VALUE")
        i += 1
        value = argv[i]
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  for key, text in overrides:
    parent, name = _resolve(config, key)
    current = parent[name]
    try:
      parent[name] = _parse_like(current, text)
    except (ValueError, TypeError, SyntaxError) as e:
      kind = type(current).__name__
      raise UserError(f"--config.{key}={text!r}: expected a {kind} ({e}); "
                      f"pass a value of that type") from None


def _resolve(config, key):
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if part not in known:
      prefix = ".".join(parts[:depth])
      scope = f"config.{prefix}" if prefix else "config"
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"did you mean '{close[0]}'? " if close else ""
      raise UserError(f"unknown config key '{key}': {scope} has no '{part}'; {hint}"
                      f"known keys: {', '.join(sorted(known))}")
    if depth == len(parts) - 1:
      return node, part
    node = node[part]


def _parse_like(current, text: str):
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("use true or false")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    if text.strip().startswith(("(", "[")):
      value = ast.literal_eval(text)
    else:
      value = [v for v in (p.strip() for p in text.split(",")) if v]
    return type(current)(value)
  if isinstance(current, ml_collections.ConfigDict):
    raise ValueError("a whole section cannot be set; set its keys one by one")
  return ast.literal_eval(text)


def check_training(config, n_devices: int) -> None:
  """Raises UserError for training settings that cannot work, before any data is read or device used."""
  from seqmodels import nonfinite, sharding
  for key in ("total_steps", "batch_size", "seq_len", "log_every", "val_every", "checkpoint_every",
              "keep_checkpoints", "max_nonfinite_steps"):
    if config[key] < 1:
      raise UserError(f"{key} is {config[key]} but must be at least 1; pass --config.{key}=N with N >= 1")
  if config.nonfinite_policy not in nonfinite.POLICIES:
    raise UserError(f"nonfinite_policy must be one of {', '.join(nonfinite.POLICIES)}, got "
                    f"'{config.nonfinite_policy}'; pass --config.nonfinite_policy=skip or halt")
  shape = dict(zip(sharding.AXES, sharding.mesh_shape(config.mesh, n_devices)))
  batch_devices = math.prod(shape[axis] for axis in sharding.BATCH_AXES)
  if config.batch_size % batch_devices:
    raise UserError(f"batch_size {config.batch_size} is not divisible by the {batch_devices} devices on the mesh's "
                    "batch axes; pick a multiple")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str) -> ml_collections.ConfigDict:
  def tuples(node):  # JSON has no tuples; configs use them for sequences.
    if isinstance(node, dict):
      return {k: tuples(v) for k, v in node.items()}
    return tuple(tuples(v) for v in node) if isinstance(node, list) else node
  with open(path) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def from_command_line(config_spec: str, argv) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Loads the config named by --config and applies the --config.* overrides found in argv."""
  config = load(config_spec)
  overrides, rest = split_override_args(argv)
  apply_overrides(config, overrides)
  return config, rest
