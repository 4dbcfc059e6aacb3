"""Writes tests/fixtures/hf_mamba_tiny: a tiny random `transformers` Mamba and its logits.

Runs outside the project's environment, in a Python with torch, transformers and safetensors
(the test environment has none of them):

  python3 -m venv /tmp/venv311 && /tmp/venv311/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors
  /tmp/venv311/bin/python scripts/make_hf_mamba_fixture.py

It writes, under tests/fixtures/hf_mamba_tiny/,

  hf/config.json, hf/model.safetensors      MambaForCausalLM.save_pretrained's own output
  state_spaces/config.json                   the same weights in the original state-spaces layout
  state_spaces/model.safetensors             (mamba_ssm parameter names, vocab 260 padded to 264),
  state_spaces/pytorch_model.bin             once as safetensors and once as a torch pickle
  logits.npz                                 input_ids (2, 12) and transformers' float32 logits

Every weight is perturbed away from its initial value (norm scales of one, D of one, A_log of
log(1..N)) so that a parameter loaded into the wrong place changes the logits.
"""

import json
import os

import numpy as np
import safetensors.torch
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf_mamba_tiny")
VOCAB, PAD_MULTIPLE = 260, 8
PADDED_VOCAB = -(-VOCAB // PAD_MULTIPLE) * PAD_MULTIPLE


def main():
  torch.manual_seed(0)
  config = transformers.MambaConfig(vocab_size=PADDED_VOCAB, hidden_size=48, state_size=16, num_hidden_layers=2,
                                    expand=2, conv_kernel=4, time_step_rank="auto", layer_norm_epsilon=1e-5,
                                    tie_word_embeddings=True, pad_vocab_size_multiple=PAD_MULTIPLE)
  model = transformers.MambaForCausalLM(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))

  hf_dir = os.path.join(OUT, "hf")
  model.save_pretrained(hf_dir, safe_serialization=True)

  # The state-spaces layout: mamba_ssm names, an unpadded vocab_size and the tied head stored too.
  state = {name.replace("backbone.embeddings.", "backbone.embedding."): tensor.contiguous()
           for name, tensor in model.state_dict().items()}
  state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
  ss_dir = os.path.join(OUT, "state_spaces")
  os.makedirs(ss_dir, exist_ok=True)
  ss_config = {"d_model": 48, "n_layer": 2, "vocab_size": VOCAB, "d_intermediate": 0,
               "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2}, "attn_layer_idx": [], "attn_cfg": {},
               "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
               "pad_vocab_size_multiple": PAD_MULTIPLE, "tie_embeddings": True}
  with open(os.path.join(ss_dir, "config.json"), "w") as f:
    json.dump(ss_config, f, indent=2)
  untied = dict(state)
  del untied["lm_head.weight"]  # safetensors refuses two names for one tensor, as save_pretrained does.
  safetensors.torch.save_file(untied, os.path.join(ss_dir, "model.safetensors"), metadata={"format": "pt"})
  torch.save(state, os.path.join(ss_dir, "pytorch_model.bin"))

  rng = np.random.default_rng(0)
  input_ids = rng.integers(0, VOCAB, size=(2, 12)).astype(np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()
  np.savez(os.path.join(OUT, "logits.npz"), input_ids=input_ids.astype(np.int32), logits=logits)
  print(f"wrote {OUT} (transformers {transformers.__version__}, torch {torch.__version__}); logits {logits.shape}")


if __name__ == "__main__":
  main()
