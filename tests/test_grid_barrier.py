"""scripts/bench_grid_barrier.py: its barrier kernel builds for CUDA (the CPU interpreter cannot run
global semaphores; the H100 runs and checks it, kernels/NOTES.md "Session 13")."""

import os
import sys

import jax
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_grid_barrier  # noqa: E402  scripts/bench_grid_barrier.py


@pytest.mark.parametrize("count", [0, 3])
def test_barrier_kernel_lowers_for_cuda(count):
  text = jax.jit(bench_grid_barrier.barrier_kernel(128, count)).trace().lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_refuses_to_run_without_a_gpu(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["bench_grid_barrier.py"])
  with pytest.raises(SystemExit, match="needs a GPU"):
    bench_grid_barrier.main()
