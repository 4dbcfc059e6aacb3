"""Defaults shared by every config: training loop, optimizer, data and mesh.

Architecture files (configs/mamba.py, configs/gpt.py, ...) start from `get_base_config()` and set
`config.model` and the sizes of their variants.
"""

import os

import ml_collections

EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "seqmodels", "assets", "tinyshakespeare.txt")


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 16  # Global, in sequences.
  config.seq_len = 256
  # Gradient accumulation: each step splits the batch into this many sequential microbatches (same
  # update as the whole batch, less activation memory). batch_size must divide evenly over them.
  config.microbatches = 1

  # What the model learns: "causal_lm" (the next token), "mlm" (BERT's masked tokens, for
  # bidirectional encoders; the mask id is the tokenizer's vocab size, so model.vocab_size must
  # exceed it) or "classification" (one label per JSONL record, from the pooled encoder output).
  config.objective = "causal_lm"
  config.num_classes = 2  # classification: labels are 0 .. num_classes - 1.
  config.init_from = ""  # classification: the workdir of an MLM run whose latest checkpoint is the encoder.

  # AdamW with linear warmup, then cosine decay to min_lr_ratio * learning_rate.
  config.learning_rate = 1e-3
  config.min_lr_ratio = 0.1
  config.warmup_steps = 100
  config.weight_decay = 0.1  # On matrices only; never on norms, biases, A_log or D.
  config.beta1 = 0.9
  config.beta2 = 0.95
  config.grad_clip = 1.0

  config.log_every = 10
  config.val_every = 100
  config.val_batches = 8
  config.checkpoint_every = 200
  config.keep_checkpoints = 3
  # A step whose loss or gradients are NaN or Inf never updates the model or optimizer state:
  # "skip" drops it and halts after max_nonfinite_steps in a row, "halt" stops at the first.
  config.nonfinite_policy = "skip"
  config.max_nonfinite_steps = 8
  # XLA's command buffers (CUDA graphs) for the train and eval steps on a GPU: "on", "off", or
  # "auto": off for a model without model.scan_layers. With its thousands of kernels a step the
  # graphs cost the host more than launching the kernels one by one (Mamba-130m synchronized on an
  # H100: 208k -> 243k tokens/s without them); a scanned step has few kernels and keeps them.
  config.command_buffers = "auto"

  # Zero-shot tasks (seqmodels/zero_shot.py) scored every eval_every steps (0: never) on the first
  # eval_limit items of each, read from eval_data_dir ("": $SEQMODELS_DATA); logged as eval/<task>/<metric>.
  config.eval_tasks = ()
  config.eval_every = 0
  config.eval_limit = 200
  config.eval_data_dir = ""

  # Weights & Biases logging beside metrics.jsonl and TensorBoard (needs `pip install wandb`). The run is
  # named after its workdir and grouped by the workdir's parent folder (a sweep's name) unless group is set.
  config.wandb = ml_collections.ConfigDict()
  config.wandb.enabled = False
  config.wandb.project = "seqmodels"
  config.wandb.group = ""

  config.data = ml_collections.ConfigDict()
  config.data.train_files = (EMBEDDED_CORPUS,)
  config.data.val_files = ()  # Empty: hold out the last val_fraction of the training tokens.
  config.data.val_fraction = 0.1
  config.data.text_field = "text"  # The JSONL field that holds a document.
  config.data.tokenizer = "byte"  # "byte", "gpt-neox" (shipped), or a path to a tokenizer.json.
  config.data.mask_rate = 0.15  # mlm: share of tokens predicted (80% [MASK], 10% random, 10% kept).
  config.data.label_field = "gold"  # classification: the JSONL field holding the label.

  # Device mesh axis sizes; -1 takes the devices the other axes leave.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  # Multi-host runs (README "Several GPUs and hosts"): every process gets the same config but its own
  # process_id, with coordinator_address = "host:port" of process 0; or auto_detect lets JAX find
  # them (SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS...). Neither: one process.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.auto_detect = False
  return config


def tiny_run(config, learning_rate: float = 2e-3) -> None:
  """The CPU-sized schedule every `tiny` variant shares: 600 steps of 16 x 128 tokens."""
  config.total_steps = 600
  config.batch_size = 16
  config.seq_len = 128
  config.learning_rate = learning_rate
  config.warmup_steps = 50
  config.val_every = 150
  config.checkpoint_every = 150


def paper_run(config, *, vocab_size: int, tokenizer: str, batch_size: int, seq_len: int, learning_rate: float,
              total_steps: int, warmup_steps: int, **optimizer) -> None:
  """A paper-scale run: bf16 compute, a subword tokenizer, validation and checkpoints every 1000 steps.

  `optimizer` overrides top-level keys such as beta2 or weight_decay where the paper's recipe differs.
  """
  config.model.vocab_size = vocab_size
  config.model.dtype = "bfloat16"
  config.data.tokenizer = tokenizer
  config.batch_size = batch_size
  config.seq_len = seq_len
  config.learning_rate = learning_rate
  config.total_steps = total_steps
  config.warmup_steps = warmup_steps
  config.val_every = 1000
  config.checkpoint_every = 1000
  for key, value in optimizer.items():
    config[key] = value


def model_defaults() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.architecture = ""
  model.d_model = 0
  model.n_layer = 0
  model.vocab_size = 257  # The byte tokenizer's 256 bytes + EOS.
  model.pad_vocab_multiple = 8
  model.tie_embeddings = True
  model.norm = "rmsnorm"  # Or "layernorm".
  model.norm_eps = 1e-5
  model.position_embedding = "none"  # Or "learned", with max_positions rows.
  model.max_positions = 0
  model.dtype = "float32"  # Compute dtype; parameters are always float32. "bfloat16" on GPU/TPU.
  # Activation memory (seqmodels/layers.py REMAT_POLICIES): "none" keeps every activation for the
  # backward pass, "block" recomputes each block from its input, "save_dots" keeps only the weight
  # matmuls' outputs, "save_kernels" only the scan kernels' outputs. Same function and
  # checkpoints; a resumed run may change it.
  model.remat = "none"
  # Run the identical blocks as one lax.scan over stacked parameters: compiles one block instead of
  # n_layer. The stacked parameters are a different checkpoint layout from the unscanned list, so a
  # run keeps the value it started with. Not for dense_mamba, dense_retnet and the parallel/compressing
  # GPT-2 variants, whose layers differ.
  model.scan_layers = False
  return model
