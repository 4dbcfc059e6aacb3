"""scripts/compare_profiles.py on a trace summary written by hand and on a compiled HLO from this
CPU: kernel families, the step-to-step differences, and what a loop body runs."""

import gzip
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import compare_profiles  # noqa: E402

HEADER = "start_us\tus\tcategory\tkernel\tscope\n"


def _profile_dir(path, ops, hlo_text):
  os.makedirs(path)
  with open(os.path.join(path, "ops.tsv"), "w") as f:
    f.write(HEADER + "".join(f"{i}\t{us}\t{category}\t{kernel}\tscope\n" for i, (us, category, kernel) in enumerate(ops)))
  with gzip.open(os.path.join(path, "hlo.txt.gz"), "wt") as f:
    f.write(hlo_text)
  return str(path)


def _scan_with_a_custom_call():
  """A compiled loop whose body holds a custom call (LAPACK's Cholesky on CPU) read by two ops."""
  def body(total, x):
    factor = jnp.linalg.cholesky(x[:, None] * x[None, :] + 4 * jnp.eye(4))
    return total + factor.sum(), factor
  step = jax.jit(lambda total, xs: jax.lax.scan(body, total, xs))
  return step.lower(jnp.float32(0), jnp.ones((6, 4))).compile().as_text()


def test_families_merge_numbering_and_differences_come_largest_first(tmp_path, capsys):
  hlo = _scan_with_a_custom_call()
  a = _profile_dir(tmp_path / "a", [(300, "scan", "selective_scan_backward"), (60, "other", "loop_add_fusion_1"),
                                    (30, "other", "loop_add_fusion_7"), (15, "other", "memcpy128")], hlo)
  b = _profile_dir(tmp_path / "b", [(300, "scan", "selective_scan_backward"), (60, "other", "loop_add_fusion_2"),
                                    (90, "other", "memcpy128"), (90, "other", "memcpy64")], hlo)
  families = compare_profiles.device_ms_by_family(a, steps=3)
  assert families[("other", "loop_add_fusion")] == [0.03, 2 / 3]
  assert families[("other", "memcpy")][0] == 0.005

  compare_profiles.main([a, b, "--steps", "3", "--hlo"])
  lines = capsys.readouterr().out.splitlines()
  rows = [line.split() for line in lines[1:4]]
  assert [row[-1] for row in rows] == ["memcpy", "loop_add_fusion", "selective_scan_backward"]
  assert rows[0][4] == "+0.055"  # 0.06 - 0.005 ms a step
  assert "total (A): 0.135 ms a step" in lines[4]
  body = next(line for line in lines if line.startswith("while body"))
  assert "(6 trips)" in body and "1 custom-call lapack_spotrf_ffi" in body
  call = next(line for line in lines if line.startswith("custom-call"))
  assert "jit(cholesky)" in call and "while" in call and "read by: " in call and "(the computation output)" not in call


def test_missing_trace_names_the_fix(tmp_path):
  with pytest.raises(SystemExit, match="ops.tsv not found: pass a config's directory under bench_train.py's --profile"):
    compare_profiles.main([str(tmp_path)])
