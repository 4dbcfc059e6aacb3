"""Convert Mamba checkpoints between the Hugging Face / state-spaces formats and our run directories.

  # A Hugging Face (state-spaces/mamba-*-hf, MambaForCausalLM.save_pretrained) or original
  # state-spaces checkpoint -> a run directory that eval.py --workdir and train.py resume from:
  python scripts/convert_checkpoint.py --from_checkpoint DIR --to_workdir WORKDIR

  # A run directory's checkpoint (the latest, or --step N) -> config.json + model.safetensors:
  python scripts/convert_checkpoint.py --from_workdir WORKDIR [--step N] --to_checkpoint DIR [--layout hf]

--layout  hf (default; MambaForCausalLM.from_pretrained reads it) or state-spaces (mamba_ssm's
          parameter names and config.json, weights as model.safetensors)

The imported run directory holds config.json (configs/mamba.py's variant of the same depth and
width, else `tiny`, with the checkpoint's sizes) and checkpoints/0/ with the imported parameters, a
freshly initialised optimizer state and the data iterator at its start. The script prints the
train.py command that continues training from it.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def train_overrides(config, variant: str) -> list[str]:
  """The --config.KEY=VALUE flags that turn configs/mamba.py:<variant> into `config`."""
  from flax import traverse_util

  from configs import mamba as mamba_configs
  base = traverse_util.flatten_dict(mamba_configs.get_config(variant).to_dict(), sep=".")
  wanted = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return [f"--config.{key}={str(value).lower() if isinstance(value, bool) else value}"
          for key, value in sorted(wanted.items()) if base.get(key) != value]


def import_checkpoint(checkpoint_dir: str, workdir: str) -> list[str]:
  """Writes `workdir` from a Hugging Face or state-spaces checkpoint; returns the train.py command."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from seqmodels import checkpoint, data, hf_mamba, trainer
  from seqmodels.errors import UserError
  from seqmodels.tokenizers import load_tokenizer

  if os.path.exists(checkpoint.config_path(workdir)) or os.path.exists(os.path.join(workdir, "checkpoints")):
    raise UserError(f"--to_workdir {workdir} already holds a run; pass a new directory")
  config, variant, params = hf_mamba.load_params(checkpoint_dir)
  run = trainer.Trainer(config, workdir)
  model_state = nnx.state(nnx.eval_shape(lambda: trainer.build_model(config)))
  nnx.replace_by_pure_dict(model_state, jax.tree.map(jnp.asarray, params))
  state = {"step": jnp.zeros((), jnp.int32), "params": model_state, "opt_state": run.tx.init(model_state)}
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, run.abstract_state))
  # The iterator train.py would build, at its start, so that resuming continues like a fresh run.
  train_tokens, _ = data.load_splits(config.data, load_tokenizer(config.data.tokenizer), seq_len=config.seq_len)
  train_iter = data.make_train_iterator(train_tokens, seq_len=config.seq_len, global_batch_size=config.batch_size,
                                        seed=config.seed)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    ckpt.save(0, state, train_iter)
  finally:
    ckpt.close()
  checkpoint.write_config(workdir, config)
  return ["python", "train.py", f"--config=configs/mamba.py:{variant}", *train_overrides(config, variant),
          f"--workdir={workdir}"]


def export_checkpoint(workdir: str, step, checkpoint_dir: str, layout: str) -> str:
  """Writes the checkpoint of `workdir` at `step` (latest when None) to `checkpoint_dir`; returns its source."""
  from flax import nnx

  from seqmodels import evaluate, hf_mamba

  loaded = evaluate.load(workdir, step)
  hf_mamba.save_checkpoint(checkpoint_dir, loaded.config.model, nnx.to_pure_dict(nnx.state(loaded.model)), layout)
  return f"{loaded.checkpoint_dir}/{loaded.step}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--from_checkpoint", help="a Hugging Face or state-spaces Mamba checkpoint directory")
  source.add_argument("--from_workdir", help="a run directory written by train.py")
  parser.add_argument("--to_workdir", help="with --from_checkpoint: the new run directory")
  parser.add_argument("--to_checkpoint", help="with --from_workdir: the checkpoint directory to write")
  parser.add_argument("--step", type=int, help="with --from_workdir: the checkpoint step (default: the latest)")
  parser.add_argument("--layout", choices=("hf", "state-spaces"), default="hf")
  args = parser.parse_args(argv)
  if args.from_checkpoint and not args.to_workdir:
    parser.error("--from_checkpoint needs --to_workdir")
  if args.from_workdir and not args.to_checkpoint:
    parser.error("--from_workdir needs --to_checkpoint")

  from seqmodels.errors import UserError  # Heavy imports after --help.
  try:
    if args.from_checkpoint:
      command = import_checkpoint(args.from_checkpoint, args.to_workdir)
      print(f"wrote {args.to_workdir}; evaluate it with eval.py --workdir {args.to_workdir}, "
            f"or train on with:\n  {' '.join(command)}")
    else:
      source = export_checkpoint(args.from_workdir, args.step, args.to_checkpoint, args.layout)
      print(f"wrote {args.to_checkpoint} ({args.layout} layout) from {source}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
