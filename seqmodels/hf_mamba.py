"""Mamba checkpoints in the Hugging Face and state-spaces formats: reading, writing, mapping names.

A checkpoint directory holds config.json and the weights in one of

    model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin, pytorch_model.bin.index.json

in one of two layouts:

    Hugging Face (transformers' MambaForCausalLM): config.json with hidden_size, num_hidden_layers,
        state_size, ...; tensors backbone.embeddings.weight, backbone.layers.N.{norm,mixer.*},
        backbone.norm_f.weight, lm_head.weight (absent when tied).
    state-spaces (mamba_ssm's MambaLMHeadModel): config.json with d_model, n_layer, vocab_size,
        ssm_cfg, pad_vocab_size_multiple, ...; the same tensor names but backbone.embedding.weight,
        and lm_head.weight stored even when tied.

Both hold the same tensors as our Mamba (seqmodels/mamba.py) in PyTorch's orientation:

    Linear weight (out, in)           -> kernel (in, out)
    conv1d.weight (d_inner, 1, width) -> conv1d.kernel (width, d_inner); both are cross-correlations
                                         over the left-padded input, so the taps keep their order
    dt_proj.bias                      -> dt_bias (our dt_proj has none; the scan adds it)
    norm .weight / .bias              -> .scale / .bias
    A_log, D, conv1d.bias, embedding  -> unchanged

Nothing in a checkpoint is executed: safetensors is read by `read_safetensors` below (an 8-byte
little-endian header length, a JSON header of dtype, shape and data_offsets, then raw little-endian
data), and pytorch_model.bin only with torch's weights-only unpickler, when torch is installed.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from configs import mamba as mamba_configs
from seqmodels import layers, lm
from seqmodels.errors import UserError
from seqmodels.paths import safe_join
from seqmodels.mamba import dt_rank

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
GPT_NEOX_VOCAB = 50277  # The published Mamba checkpoints use the GPT-NeoX tokenizer.


# Safetensors.

def read_safetensors(path: str) -> dict:
  """The tensors of a .safetensors file as numpy arrays; floating point ones as float32."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise UserError(f"{path} is not a safetensors file (shorter than its 8-byte header); "
                      "re-download or re-convert it")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
      raise UserError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes in a "
                      f"{size}-byte file); re-download or re-convert it")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
      header = None
  if not isinstance(header, dict):
    raise UserError(f"{path} has no valid safetensors JSON header; re-download or re-convert it")
  data_start, data_size = 8 + header_len, size - 8 - header_len
  data = np.zeros(0, np.uint8)
  if data_size:  # Mapped, not read: a shard can be several GB.
    data = np.memmap(path, np.uint8, mode="r", offset=data_start, shape=(data_size,))
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
      begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
      raise UserError(f"{path}: tensor '{name}' has a malformed header entry; re-download or re-convert it") from None
    if dtype not in SAFETENSORS_DTYPES:
      raise UserError(f"{path}: tensor '{name}' has dtype {dtype}, which is not supported; "
                      f"convert it to one of {', '.join(SAFETENSORS_DTYPES)}")
    item = np.dtype(SAFETENSORS_DTYPES[dtype])
    fits = 0 <= begin <= end <= data_size and end - begin == math.prod(shape) * item.itemsize
    if min(shape, default=0) < 0 or not fits:
      raise UserError(f"{path}: tensor '{name}' has data_offsets [{begin}, {end}] that do not fit its shape {shape} "
                      f"inside the file's {data_size} data bytes; the file is corrupt, re-download or re-convert it")
    raw = data[begin:end].view(item).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32.
      raw = (raw.astype(np.uint32) << 16).view(np.float32)
    tensors[name] = raw.astype(np.float32) if raw.dtype.kind == "f" else np.array(raw)
  return tensors


def write_safetensors(path: str, tensors: dict) -> None:
  """Writes float32 tensors to a .safetensors file that transformers and the safetensors library read."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  arrays = [(name, np.ascontiguousarray(tensors[name], dtype="<f4")) for name in sorted(tensors)]
  for name, array in arrays:
    header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # The data starts 8-byte aligned, as the reference writer keeps it.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for _, array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)


def read_torch_bin(path: str) -> dict:
  """A pytorch_model.bin state dict, through torch's weights-only unpickler (no code runs)."""
  try:
    import torch
  except ImportError:
    raise UserError(f"{path} is a PyTorch pickle and torch is not installed; install torch, or convert the "
                    "checkpoint to model.safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # Pickle, zip and torch errors all mean the same thing here.
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path} could not be read as a weights-only PyTorch checkpoint ({detail}); "
                    "re-download it or convert it to model.safetensors") from None
  if not isinstance(state, dict):
    raise UserError(f"{path} does not hold a state dict of tensors; re-download or re-convert it")
  return {name: (t.float() if t.is_floating_point() else t).numpy() for name, t in state.items()
          if isinstance(t, torch.Tensor)}


def read_weights(directory: str) -> dict:
  """All tensors of a checkpoint directory, from its single or sharded weight files."""
  present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
  if not present:
    raise UserError(f"checkpoint {directory} has none of {', '.join(WEIGHT_FILES)}; "
                    "point --checkpoint at a Hugging Face or state-spaces Mamba directory")
  name = present[0]
  files = [name]
  if name.endswith(".index.json"):
    index = _read_json(os.path.join(directory, name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f"{os.path.join(directory, name)} has no weight_map; re-download the checkpoint")
    files = sorted(set(weight_map.values()))
  tensors = {}
  for file in files:
    path = safe_join(directory, file, what="weight file")
    if not os.path.isfile(path):
      raise UserError(f"checkpoint {directory} lacks its weight file {file}; re-download the checkpoint")
    tensors.update(read_safetensors(path) if file.endswith(".safetensors") else read_torch_bin(path))
  return tensors


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f"no {os.path.basename(path)} in {os.path.dirname(path)}; "
                    "point --checkpoint at a Hugging Face or state-spaces Mamba directory") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); re-download or re-convert the checkpoint") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} is not a JSON object; re-download or re-convert the checkpoint")
  return value


# Configs.

@dataclasses.dataclass(frozen=True)
class Layout:
  embedding: str  # The embedding table's tensor name.
  conv_bias: bool  # False: the checkpoint's conv1d has no bias, which is our bias at zero.


def read_config(directory: str):
  """(run config, its configs/mamba.py variant, Layout) of a checkpoint directory.

  The run config is configs/mamba.py's with the checkpoint's sizes.
  Its schedule is that of the paper variant with the same depth and width, else of `tiny`;
  compute stays float32, the checkpoints' own precision.
  """
  if not os.path.isdir(directory):
    raise UserError(f"checkpoint directory {directory} does not exist; pass a directory with config.json and weights")
  path = os.path.join(directory, "config.json")
  raw = _read_json(path)
  try:
    if "hidden_size" in raw:
      model, layout = _from_hf_config(raw, path)
    elif "d_model" in raw:
      model, layout = _from_state_spaces_config(raw, path)
    else:
      raise UserError(f"{path} is neither a Hugging Face Mamba config (hidden_size, ...) nor a state-spaces one "
                      "(d_model, ...); point --checkpoint at a Mamba checkpoint")
  except KeyError as e:
    raise UserError(f"{path} lacks the key {e}; re-download or re-convert the checkpoint") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path} has a value of the wrong type ({e}); re-download or re-convert the checkpoint") from None
  variant = next((name for name, (n_layer, d_model, *_) in mamba_configs.PAPER_SIZES.items()
                  if (n_layer, d_model) == (model["n_layer"], model["d_model"])), "tiny")
  config = mamba_configs.get_config(variant)
  config.model.update(model)
  config.model.dtype = "float32"
  config.data.tokenizer = "gpt-neox" if model["vocab_size"] >= GPT_NEOX_VOCAB else "byte"
  lm.check_config(config.model)
  return config, variant, layout


def _from_hf_config(raw, path):
  if raw.get("model_type", "mamba") != "mamba":
    raise UserError(f"{path} is a '{raw['model_type']}' model, not Mamba; only Mamba (model_type 'mamba') converts")
  if raw.get("use_bias", False):
    raise UserError(f"{path} has use_bias=true (biased in_proj/out_proj), which our Mamba does not have")
  if raw.get("hidden_act", "silu") != "silu":
    raise UserError(f"{path} has hidden_act '{raw['hidden_act']}'; our Mamba uses silu, as the paper does")
  d_model, expand = int(raw["hidden_size"]), int(raw.get("expand", 2))
  if int(raw.get("intermediate_size", expand * d_model)) != expand * d_model:
    raise UserError(f"{path} has intermediate_size {raw['intermediate_size']} != expand * hidden_size; "
                    "our Mamba needs d_inner = expand * d_model")
  rank = raw.get("time_step_rank", "auto")
  model = {
      "d_model": d_model, "n_layer": int(raw["num_hidden_layers"]), "expand": expand,
      # transformers' embedding has exactly vocab_size rows, already padded.
      "vocab_size": int(raw["vocab_size"]), "pad_vocab_multiple": 1,
      "d_state": int(raw.get("state_size", 16)), "d_conv": int(raw.get("conv_kernel", 4)),
      "dt_rank": 0 if rank == "auto" else int(rank), "norm": "rmsnorm",
      "norm_eps": float(raw.get("layer_norm_epsilon", 1e-5)),
      "tie_embeddings": bool(raw.get("tie_word_embeddings", True)),
      "dt_min": float(raw.get("time_step_min", 1e-3)), "dt_max": float(raw.get("time_step_max", 0.1)),
      "dt_init_floor": float(raw.get("time_step_floor", 1e-4)),
  }
  return model, Layout("backbone.embeddings.weight", bool(raw.get("use_conv_bias", True)))


def _from_state_spaces_config(raw, path):
  ssm = raw.get("ssm_cfg") or {}
  if ssm.get("layer", "Mamba1") != "Mamba1":
    raise UserError(f"{path} has ssm_cfg.layer '{ssm['layer']}'; only Mamba1 checkpoints convert")
  if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
    raise UserError(f"{path} has MLP (d_intermediate) or attention (attn_layer_idx) layers; only pure Mamba converts")
  if ssm.get("bias", False):
    raise UserError(f"{path} has ssm_cfg.bias=true (biased in_proj/out_proj), which our Mamba does not have")
  rank = ssm.get("dt_rank", "auto")
  rms = bool(raw.get("rms_norm", True))
  model = {
      "d_model": int(raw["d_model"]), "n_layer": int(raw["n_layer"]), "vocab_size": int(raw["vocab_size"]),
      "pad_vocab_multiple": int(raw.get("pad_vocab_size_multiple", 8)),
      "d_state": int(ssm.get("d_state", 16)), "d_conv": int(ssm.get("d_conv", 4)), "expand": int(ssm.get("expand", 2)),
      "dt_rank": 0 if rank == "auto" else int(rank), "norm": "rmsnorm" if rms else "layernorm",
      "norm_eps": float(raw.get("norm_epsilon", 1e-5)), "tie_embeddings": bool(raw.get("tie_embeddings", True)),
      "dt_min": float(ssm.get("dt_min", 1e-3)), "dt_max": float(ssm.get("dt_max", 0.1)),
      "dt_init_floor": float(ssm.get("dt_init_floor", 1e-4)),
  }
  return model, Layout("backbone.embedding.weight", bool(ssm.get("conv_bias", True)))


def hf_config(model_cfg) -> dict:
  """transformers' MambaConfig (as config.json) for our model config."""
  if model_cfg.architecture != "mamba":
    raise UserError(f"only model.architecture 'mamba' exports to the Hugging Face Mamba format, not "
                    f"'{model_cfg.architecture}'")
  if model_cfg.norm != "rmsnorm" or model_cfg.position_embedding != "none":
    raise UserError("the Hugging Face Mamba has RMSNorm and no position embedding; this run has "
                    f"model.norm '{model_cfg.norm}' and model.position_embedding '{model_cfg.position_embedding}'")
  d_inner = model_cfg.expand * model_cfg.d_model
  return {
      "architectures": ["MambaForCausalLM"], "model_type": "mamba",
      "vocab_size": layers.pad_vocab(model_cfg.vocab_size, model_cfg.pad_vocab_multiple),
      "pad_vocab_size_multiple": model_cfg.pad_vocab_multiple,
      "hidden_size": model_cfg.d_model, "num_hidden_layers": model_cfg.n_layer, "state_size": model_cfg.d_state,
      "expand": model_cfg.expand, "intermediate_size": d_inner, "conv_kernel": model_cfg.d_conv,
      "time_step_rank": dt_rank(model_cfg), "layer_norm_epsilon": model_cfg.norm_eps,
      "tie_word_embeddings": model_cfg.tie_embeddings, "use_bias": False, "use_conv_bias": True,
      "hidden_act": "silu", "residual_in_fp32": True, "time_step_min": model_cfg.dt_min,
      "time_step_max": model_cfg.dt_max, "time_step_floor": model_cfg.dt_init_floor, "dtype": "float32",
  }


def state_spaces_config(model_cfg) -> dict:
  """mamba_ssm's MambaConfig (as config.json) for our model config."""
  if model_cfg.architecture != "mamba" or model_cfg.position_embedding != "none":
    raise UserError(f"only model.architecture 'mamba' without position embeddings exports to the state-spaces "
                    f"format, not '{model_cfg.architecture}' with '{model_cfg.position_embedding}'")
  ssm = {"layer": "Mamba1", "d_state": model_cfg.d_state, "d_conv": model_cfg.d_conv, "expand": model_cfg.expand,
         "dt_rank": dt_rank(model_cfg), "dt_min": model_cfg.dt_min, "dt_max": model_cfg.dt_max,
         "dt_init_floor": model_cfg.dt_init_floor}
  return {"d_model": model_cfg.d_model, "n_layer": model_cfg.n_layer, "d_intermediate": 0,
          "vocab_size": model_cfg.vocab_size, "pad_vocab_size_multiple": model_cfg.pad_vocab_multiple,
          "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": model_cfg.norm == "rmsnorm",
          "norm_epsilon": model_cfg.norm_eps, "residual_in_fp32": True, "fused_add_norm": True,
          "tie_embeddings": model_cfg.tie_embeddings}


# Parameter names.

def _same(x):
  return x


def _transpose(x):
  return x.T


def _conv_to_ours(w):
  return w.reshape(w.shape[0], w.shape[-1]).T


def _conv_to_hf(k):
  return k.T[:, None, :]


_LINEAR, _SAME, _CONV = (_transpose, _transpose), (_same, _same), (_conv_to_ours, _conv_to_hf)
_NORM = {("scale",): ("weight", _SAME), ("bias",): ("bias", _SAME)}
_MIXER = {
    ("in_proj", "kernel"): ("in_proj.weight", _LINEAR),
    ("conv1d", "kernel"): ("conv1d.weight", _CONV),
    ("conv1d", "bias"): ("conv1d.bias", _SAME),
    ("x_proj", "kernel"): ("x_proj.weight", _LINEAR),
    ("dt_proj", "kernel"): ("dt_proj.weight", _LINEAR),
    ("dt_bias",): ("dt_proj.bias", _SAME),
    ("A_log",): ("A_log", _SAME),
    ("D",): ("D", _SAME),
    ("out_proj", "kernel"): ("out_proj.weight", _LINEAR),
}


def checkpoint_name(path: tuple, embedding: str):
  """The checkpoint tensor name of our parameter `path` and its (to_ours, to_checkpoint) transforms."""
  match path:
    case ("embed", "embedding"):
      return embedding, _SAME
    case ("head", "kernel"):
      return "lm_head.weight", _LINEAR
    case ("norm_f", *rest):
      name, transforms = _NORM[tuple(rest)]
      return f"backbone.norm_f.{name}", transforms
    case ("backbone", "blocks", i, "norm", *rest):
      name, transforms = _NORM[tuple(rest)]
      return f"backbone.layers.{i}.norm.{name}", transforms
    case ("backbone", "blocks", i, "mixer", *rest):
      name, transforms = _MIXER[tuple(rest)]
      return f"backbone.layers.{i}.mixer.{name}", transforms
  raise ValueError(f"no checkpoint name for parameter {path}")


def import_params(abstract_params: dict, tensors: dict, layout: Layout, where: str) -> dict:
  """Our nested pure-dict params (shaped like `abstract_params`) from the checkpoint's tensors."""
  flat, used = {}, set()
  for path, leaf in traverse_util.flatten_dict(abstract_params).items():
    name, (to_ours, to_checkpoint) = checkpoint_name(path, layout.embedding)
    if name not in tensors and not layout.conv_bias and name.endswith("conv1d.bias"):
      flat[path] = np.zeros(leaf.shape, np.float32)
      continue
    if name not in tensors:
      raise UserError(f"checkpoint {where} has no tensor '{name}' that its config.json implies; "
                      "the weights and config.json do not belong together")
    value = np.asarray(to_ours(tensors[name]), np.float32)
    if value.shape != tuple(leaf.shape):
      expected = to_checkpoint(np.zeros(leaf.shape)).shape
      raise UserError(f"checkpoint {where}: tensor '{name}' has shape {tuple(tensors[name].shape)}, but config.json "
                      f"implies {tuple(expected)}; the weights and config.json do not belong together")
    flat[path] = value
    used.add(name)
  if "lm_head.weight" in tensors and "lm_head.weight" not in used:
    # A tied checkpoint may store the head too (state-spaces does); it must then be the embedding.
    if not np.array_equal(tensors["lm_head.weight"], tensors[layout.embedding]):
      raise UserError(f"checkpoint {where} ties the head to the embedding in config.json but stores a different "
                      "lm_head.weight; set tie_embeddings (tie_word_embeddings) to false there")
    used.add("lm_head.weight")
  unknown = sorted(set(tensors) - used)
  if unknown:
    raise UserError(f"checkpoint {where} holds tensors our Mamba has no place for ({', '.join(unknown[:3])}"
                    f"{', ...' if len(unknown) > 3 else ''}); it is not a plain Mamba LM")
  return traverse_util.unflatten_dict(flat)


def export_params(params: dict, embedding: str = "backbone.embeddings.weight") -> dict:
  """Checkpoint-named float32 numpy tensors from our nested pure-dict params."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(params).items():
    name, (_, to_checkpoint) = checkpoint_name(path, embedding)
    tensors[name] = np.asarray(to_checkpoint(np.asarray(value, np.float32)))
  return tensors


# Entry points.

def load_params(directory: str):
  """(run config, variant, nested pure-dict params) of a Hugging Face or state-spaces checkpoint."""
  config, variant, layout = read_config(directory)
  abstract = nnx.to_pure_dict(nnx.state(lm.abstract(config.model)))
  params = import_params(abstract, read_weights(directory), layout, directory)
  return config, variant, params


def load_hf_mamba(path: str):
  """(LanguageModel with the checkpoint's weights, its run config) for `eval.py --checkpoint PATH`."""
  config, _, params = load_params(path)
  graphdef, state = nnx.split(lm.abstract(config.model))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state), config


def save_checkpoint(directory: str, model_cfg, params: dict, layout: str = "hf") -> None:
  """Writes our params (a nested pure dict) as config.json + model.safetensors in `layout`.

  layout "hf" is what MambaForCausalLM.from_pretrained reads; "state-spaces" has mamba_ssm's names
  and config, with the tied head stored as well, as mamba_ssm's state dict holds it.
  """
  if layout == "hf":
    config, tensors = hf_config(model_cfg), export_params(params)
  elif layout == "state-spaces":
    config, tensors = state_spaces_config(model_cfg), export_params(params, "backbone.embedding.weight")
    tensors.setdefault("lm_head.weight", tensors["backbone.embedding.weight"])
  else:
    raise UserError(f"unknown checkpoint layout '{layout}'; use 'hf' or 'state-spaces'")
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
