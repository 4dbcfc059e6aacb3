"""bench_scan.py --compare --check: a peer's output and gradients are judged as ours are.

The peers themselves run through torch on a GPU (scripts/scan_peers.py); here a peer is one of our
own impls behind the peer interface, in our layouts, so that what is tested is the checker: a peer
doing equal work scores as that impl does, and a peer fed the wrong inputs is caught.
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_scan  # noqa: E402  scripts/bench_scan.py

SHAPE = dict(batch=1, length=16, d=8, n=4)


class AssociativeAsPeer:
  """Our "associative" selective scan behind the peer interface; swap_bc feeds it B for C and C
  for B, the kind of layout slip the check must catch."""

  label = "associative as a peer"

  def __init__(self, swap_bc):
    self.swap_bc = swap_bc

  def arguments(self, ins, dy=None):
    ins = dict(ins, B=ins["C"], C=ins["B"]) if self.swap_bc else ins
    return ins, dy

  def _run(self, ins):
    return bench_scan.WORKLOADS["selective_scan"].run("associative", ins)

  def forward(self, args):
    return self._run(args[0])

  def forward_backward(self, args):
    out, vjp = jax.vjp(self._run, args[0])
    return out, vjp(args[1].astype(out.dtype))[0]

  def ours(self, y, grads):
    return y.astype(jnp.float32), {k: g.astype(jnp.float32) for k, g in grads.items()}


def test_check_peer_scores_equal_work_as_ours_and_catches_swapped_inputs():
  workload = bench_scan.WORKLOADS["selective_scan"]
  label, ins, flags = workload.check_cases(SHAPE)[0]
  want_out, want_grads = bench_scan.reference_results(workload, label, ins, flags, SHAPE)
  ours_out, ours_grads = bench_scan.outputs_and_grads(workload, "associative", ins, flags)
  ours_errs = {k: bench_scan.relative_error(g, want_grads[k]) for k, g in ours_grads.items()}

  [(peer_label, out_errs, grad_errs)] = bench_scan.check_peer(workload, AssociativeAsPeer(False), SHAPE)
  assert peer_label == label == "mamba"
  assert set(grad_errs) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias"}
  assert out_errs == pytest.approx([bench_scan.relative_error(ours_out, want_out)], rel=1e-3)
  assert grad_errs == pytest.approx(ours_errs, rel=1e-3)
  assert max(out_errs + list(grad_errs.values())) < 1e-2  # bf16 against the float32 reference

  [(_, out_errs, grad_errs)] = bench_scan.check_peer(workload, AssociativeAsPeer(True), SHAPE)
  assert out_errs[0] > 0.05 and grad_errs["B"] > 0.5 and grad_errs["C"] > 0.5
