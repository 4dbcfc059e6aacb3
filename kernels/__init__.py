"""Compute kernels shared by every architecture in seqmodels.

Every recurrent model (Mamba, DenseSSM, RetNet, LION, ...) runs its time recurrence through the
one `selective_scan` interface. Its `impl` argument picks the implementation (a `lax.scan`
reference, a parallel `lax.associative_scan`, or "auto" for the fastest on the current backend);
all produce the same result, so callers never know or care which one ran.
"""

from kernels.selective_scan import selective_scan

__all__ = ["selective_scan"]
