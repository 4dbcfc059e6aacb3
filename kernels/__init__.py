"""Compute kernels shared by every architecture in seqmodels.

Every recurrent model runs its time recurrence through one of two interfaces: `selective_scan`
(Mamba's S6, for Mamba, DenseSSM, ...) or `linear_attention` (decayed causal linear attention, for
RetNet, GLA, LION, ...). Their `impl` argument picks the implementation (a `lax.scan` reference, a
parallel `lax.associative_scan`, for linear attention a matmul-based "chunked" one, or "auto" for
the fastest on the current backend); all produce the same result, so callers never know or care
which one ran. Mamba's one-token decoding step has a kernel of its own on GPU
(kernels/selective_scan_step.py), which seqmodels/mamba.py picks the same way.
"""

from kernels.linear_attention import linear_attention
from kernels.selective_scan import selective_scan

__all__ = ["linear_attention", "selective_scan"]
