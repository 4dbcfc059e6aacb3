"""Compute kernels shared by every architecture in seqmodels.

Every recurrent model runs its time recurrence through one of two interfaces: `selective_scan`
(Mamba's S6, for Mamba, DenseSSM, ...) or `linear_attention` (decayed causal linear attention, for
RetNet, GLA, LION, ...). Their `impl` argument picks the implementation (a `lax.scan` reference, a
parallel `lax.associative_scan`, for linear attention a matmul-based "chunked" one, or "auto" for
the fastest on the current backend); all produce the same result, so callers never know or care
which one ran. Mamba's one-token decoding step has a kernel of its own on GPU
(kernels/selective_scan_step.py), which seqmodels/mamba.py picks the same way.
"""

import contextlib
import importlib

from kernels.linear_attention import linear_attention
from kernels.selective_scan import selective_scan

__all__ = ["linear_attention", "selective_scan", "set_tuning", "tuned"]


def set_tuning(settings):
  """Sets kernel tuning constants from "module.NAME=INT" strings (the benchmarks' --set), e.g.
  "selective_scan_step.TRITON_WARPS=8"; a bool constant takes 0 or 1. Returns the settings that
  restore the values it replaced."""
  previous = []
  for setting in settings:
    name, _, value = setting.partition("=")
    module_name, _, constant = name.rpartition(".")
    try:
      module = importlib.import_module(f"kernels.{module_name}")
    except (ImportError, ValueError):  # ValueError: an empty module name
      module = None
    if not hasattr(module, constant) or not value.lstrip("-").isdigit():
      raise SystemExit(f"error: --set {setting}: expected module.CONSTANT=INTEGER naming a constant in kernels/")
    old = getattr(module, constant)
    previous.append(f"{name}={int(old)}")
    setattr(module, constant, type(old)(int(value)))
  return previous


@contextlib.contextmanager
def tuned(settings):
  """set_tuning(settings) for the body of a with statement, then the values it replaced again."""
  previous = set_tuning(settings)
  try:
    yield
  finally:
    set_tuning(previous)
