"""kernels.selective_scan against a float64 NumPy oracle written straight from the equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import selective_scan
from kernels.selective_scan_pallas import selective_scan_pallas
from oracle import assert_gradients_match_oracle, to_jax, to_numpy

# "pallas" runs the Pallas kernels in interpret mode on CPU.
IMPLS = ("reference", "associative", "auto", "pallas")
BATCH, D_MODEL, N_STATE = 2, 8, 4
OPTIONAL = ("D", "z", "dt_bias", "h0")

# Inputs (length, groups, which optional arrays exist) and flags, one combination per case.
CASES = {
    "plain": dict(),
    "length_13": dict(length=13),
    "h0": dict(optional=("h0",)),
    "reverse": dict(reverse=True),
    "reverse_h0_state": dict(optional=("h0",), reverse=True, return_state=True),
    "groups_2": dict(groups=2),
    "groups_1_4d": dict(groups=1, length=13),
    "z": dict(optional=("z",)),
    "D": dict(optional=("D",)),
    "softplus_bias": dict(optional=("dt_bias",), dt_softplus=True),
    "softplus_no_bias": dict(dt_softplus=True),
    "state": dict(return_state=True),
    "everything": dict(length=13, groups=2, optional=OPTIONAL, dt_softplus=True, reverse=True,
                       return_state=True),
    # One decoding step from a state (the reference runs it without a loop).
    "decode_step": dict(length=1, groups=2, optional=OPTIONAL, dt_softplus=True, return_state=True),
}


def oracle(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, h0=None,
           reverse=False, return_state=False):
  """The selective scan one time step and one channel at a time, in float64."""
  batch, length, d = x.shape
  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  channels_per_group = d // B.shape[2]
  if dt_bias is not None:
    dt = dt + dt_bias
  if dt_softplus:
    dt = np.log1p(np.exp(dt))
  h = np.zeros((batch, d, A.shape[1])) if h0 is None else h0.copy()
  y = np.zeros((batch, length, d))
  for t in reversed(range(length)) if reverse else range(length):
    for c in range(d):
      g = c // channels_per_group
      decay = np.exp(dt[:, t, c, None] * A[c])
      h[:, c] = decay * h[:, c] + (dt[:, t, c] * x[:, t, c])[:, None] * B[:, t, g]
      y[:, t, c] = np.sum(C[:, t, g] * h[:, c], axis=-1)
  if D is not None:
    y = y + D * x
  if z is not None:
    y = y * z / (1 + np.exp(-z))
  return (y, h) if return_state else y


def setup(length=7, groups=None, optional=(), seed=0, **flags):
  """Random float64 inputs in the ranges a trained Mamba sees, and the flags to pass alongside."""
  rng = np.random.default_rng(seed)
  seq = (BATCH, length, D_MODEL)
  bc = (BATCH, length, N_STATE) if groups is None else (BATCH, length, groups, N_STATE)
  softplus = flags.get("dt_softplus", False)
  inputs = {
      "x": rng.normal(size=seq),
      "dt": rng.normal(-1.0, 0.5, size=seq) if softplus else rng.uniform(0.05, 0.5, size=seq),
      "A": -rng.uniform(0.5, 2.0, size=(D_MODEL, N_STATE)),
      "B": rng.normal(size=bc),
      "C": rng.normal(size=bc),
      "D": rng.normal(size=D_MODEL),
      "z": rng.normal(size=seq),
      "dt_bias": rng.uniform(-0.2, 0.2, size=D_MODEL),
      "h0": rng.normal(size=(BATCH, D_MODEL, N_STATE)),
  }
  return {k: v for k, v in inputs.items() if k not in OPTIONAL or k in optional}, flags



@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_oracle(impl, case):
  inputs, flags = setup(**CASES[case])
  arrays = to_jax(inputs)
  got = selective_scan(**arrays, **flags, impl=impl)
  want = oracle(**to_numpy(arrays), **flags)
  if flags.get("return_state"):
    (got, h), (want, want_h) = got, want
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
  assert got.dtype == jnp.float32 and got.shape == inputs["x"].shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_accumulate_in_float32(impl):
  inputs, flags = setup(**CASES["everything"])
  arrays = to_jax(inputs, jnp.bfloat16)
  y, h = selective_scan(**arrays, **flags, impl=impl)
  want_y, want_h = oracle(**to_numpy(arrays), **flags)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=2e-2, atol=2e-2)
  # bf16 values are exact in float32, so a float32 state matches the oracle to float32 precision.
  np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)


# Interpret mode is slow: the Pallas kernels get the two corners, the XLA impls all four. The
# second corner drops z, as DenseMamba's readout scan does (its own kernel outputs change then).
GRADIENT_CASES = [(impl, reverse, groups, OPTIONAL if groups is None or impl != "pallas" else ("D", "dt_bias", "h0"))
                  for impl in IMPLS for reverse in (False, True)
                  for groups in (None, 2) if impl != "pallas" or reverse == (groups is None)]


@pytest.mark.parametrize("impl, reverse, groups, optional", GRADIENT_CASES)
def test_gradients_match_oracle_finite_differences(impl, reverse, groups, optional):
  inputs, flags = setup(groups=groups, optional=optional, dt_softplus=True, reverse=reverse,
                        return_state=True, seed=1)
  assert_gradients_match_oracle(functools.partial(selective_scan, impl=impl), oracle, inputs, flags, seed=2)


def test_reference_and_associative_agree_on_long_sequence():
  inputs, flags = setup(length=257, groups=2, optional=OPTIONAL, dt_softplus=True,
                        return_state=True)
  w = np.random.default_rng(3).normal(size=inputs["x"].shape)

  def run(impl):
    def loss(arrays):
      y, h = selective_scan(**arrays, **flags, impl=impl)
      return (y * w).sum() + h.sum(), (y, h)
    return jax.jit(jax.grad(loss, has_aux=True))(to_jax(inputs))

  for ref, assoc in zip(jax.tree.leaves(run("reference")), jax.tree.leaves(run("associative"))):
    np.testing.assert_allclose(ref, assoc, rtol=1e-4, atol=1e-4)


def test_pallas_kernels_in_tpu_interpret_mode_match_oracle_and_reference_gradients():
  """The same kernels through Mosaic TPU's interpreter, which models TPU memory spaces and DMAs.

  It computes in float32 only, so gradients are checked against the float32 "reference" impl.
  """
  from jax.experimental.pallas import tpu as pltpu
  inputs, flags = setup(length=11, groups=2, optional=OPTIONAL, dt_softplus=True, reverse=True,
                        return_state=True, seed=4)
  arrays = to_jax(inputs)

  def loss(arrays, scan):
    y, h = scan(**arrays, **flags)
    return (y * arrays["x"]).sum() + (h * h).sum(), (y, h)

  def tpu_kernels(x, dt, A, B, C, D, *, z, dt_bias, dt_softplus, h0, reverse, return_state):
    return selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, reverse,
                                 return_state, interpret=pltpu.InterpretParams())

  grads, (y, h) = jax.grad(loss, has_aux=True)(arrays, tpu_kernels)
  want_y, want_h = oracle(**to_numpy(arrays), **flags)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
  want_grads, _ = jax.grad(loss, has_aux=True)(
      arrays, functools.partial(selective_scan, impl="reference"))
  for name in inputs:
    np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_unknown_impl_lists_available_ones():
  inputs, _ = setup()
  expected = r"impl must be one of \('auto', 'reference', 'associative', 'pallas'\), got 'cuda'"
  with pytest.raises(ValueError, match=expected):
    selective_scan(**to_jax(inputs), impl="cuda")


BAD_SHAPES = {
    "x": dict(x=np.zeros((BATCH, 7))),
    "dt": dict(dt=np.zeros((BATCH, 6, D_MODEL))),
    "A": dict(A=np.zeros((N_STATE, D_MODEL))),
    "B": dict(B=np.zeros((BATCH, 7, 3, N_STATE)), C=np.zeros((BATCH, 7, 3, N_STATE))),
    "C": dict(C=np.zeros((BATCH, 7, N_STATE + 1))),
    "D": dict(D=np.zeros(D_MODEL + 1)),
    "z": dict(z=np.zeros((BATCH, 7, D_MODEL, 1))),
    "dt_bias": dict(dt_bias=np.zeros((1, D_MODEL))),
    "h0": dict(h0=np.zeros((BATCH, N_STATE, D_MODEL))),
}


@pytest.mark.parametrize("name", BAD_SHAPES)
def test_bad_shape_names_the_argument(name):
  inputs, _ = setup()
  with pytest.raises(ValueError, match=rf"^{name} must have") as error:
    selective_scan(**{**inputs, **BAD_SHAPES[name]})
  assert "\n" not in str(error.value)
