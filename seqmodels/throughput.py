"""Model FLOPs utilization (MFU): the share of the chips' peak matmul rate that training achieves.

    MFU = tokens/s per device x flops_per_token / peak FLOP/s of the device

    flops_per_token = 6 x matmul_params + extra_flops_per_token(seq_len)        (seqmodels/lm.py)

6 x matmul_params is the forward (2 flops per parameter per token) plus the backward (twice the
forward) of every matmul weight, the output head included (tied embeddings count once, as the head;
embedding lookups are no matmuls). The backbone adds what no parameter counts: causal attention's
scores and weighted sum, 6 x seq_len x d_model per layer (2 matmuls of 2 x seq_len x d flops per
token, halved by the mask, x3 for forward plus backward), and for recurrent models the scan,
3 x 9 x d_inner x d_state per Mamba layer (the Mamba paper's count) or its form's count for
retention and LION. Rematerialized recomputation is not counted: MFU measures model work, not what
the hardware was made to do.

Peak rates are dense bf16 tensor-core FLOP/s from the vendors' datasheets (no 2:4 sparsity).
"""

import jax

# Substring of jax's device_kind -> dense bf16 peak FLOP/s per device. More specific names first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # H100 SXM5.
    ("H200", 989e12),  # The H100's compute with more, faster memory.
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


def peak_flops(device=None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first), or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, device=None) -> float | None:
  peak = peak_flops(device)
  return None if peak is None else tokens_per_sec_per_device * flops_per_token / peak
