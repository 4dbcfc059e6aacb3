"""kernels.linear_attention against a float64 NumPy oracle written straight from the equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import linear_attention
from oracle import assert_gradients_match_oracle, to_jax, to_numpy

IMPLS = ("reference", "associative", "chunked", "auto")
# The Pallas kernels (TPU interpret mode on CPU) take the forward checks; their gradients are checked
# against float64 autodiff in test_linear_attention_pallas.py, where finite differences would be slow.
FORWARD_IMPLS = (*IMPLS, "pallas")
BATCH, HEADS, DK, DV = 2, 3, 4, 5
# Small enough that every test length spans several chunks, most of them with a padded tail.
CHUNK = 4

# Inputs (length, log_decay form, whether h0 exists) and flags, one combination per case.
CASES = {
    "no_decay": dict(decay="none"),
    "per_head": dict(decay="head"),
    "per_token": dict(decay="token"),
    "per_channel": dict(decay="channel"),
    "length_12_whole_chunks": dict(length=12, decay="channel"),
    "length_13": dict(length=13, decay="head"),
    "length_2_below_chunk": dict(length=2),
    "h0": dict(with_h0=True),
    "reverse": dict(reverse=True, decay="channel"),
    "state": dict(return_state=True, decay="none"),
    "reverse_h0_state": dict(length=13, with_h0=True, reverse=True, return_state=True),
    "reverse_h0_state_per_channel": dict(length=13, decay="channel", with_h0=True, reverse=True,
                                         return_state=True),
}


def oracle(q, k, v, log_decay=None, h0=None, reverse=False, return_state=False):
  """Linear attention one time step and one head at a time, in float64."""
  batch, length, heads, dk = q.shape
  s = np.zeros((batch, heads, dk, v.shape[-1])) if h0 is None else h0.copy()
  o = np.zeros(v.shape)
  for t in reversed(range(length)) if reverse else range(length):
    for h in range(heads):
      if log_decay is None:
        decay = np.ones((batch, dk))
      elif log_decay.ndim == 1:
        decay = np.full((batch, dk), np.exp(log_decay[h]))
      elif log_decay.ndim == 3:
        decay = np.repeat(np.exp(log_decay[:, t, h, None]), dk, axis=1)
      else:
        decay = np.exp(log_decay[:, t, h])
      s[:, h] = decay[:, :, None] * s[:, h] + k[:, t, h, :, None] * v[:, t, h, None, :]
      o[:, t, h] = np.einsum("bkv,bk->bv", s[:, h], q[:, t, h])
  return (o, s) if return_state else o


def setup(length=7, decay="token", with_h0=False, decay_range=(-1.0, -0.01), seed=0, **flags):
  """Random float64 inputs, log-decays drawn from decay_range, and the flags to pass alongside."""
  rng = np.random.default_rng(seed)
  qk = (BATCH, length, HEADS, DK)
  decay_shapes = {"head": (HEADS,), "token": qk[:3], "channel": qk}
  inputs = {
      "q": rng.normal(size=qk),
      "k": rng.normal(size=qk),
      "v": rng.normal(size=(BATCH, length, HEADS, DV)),
  }
  if decay != "none":
    inputs["log_decay"] = rng.uniform(*decay_range, size=decay_shapes[decay])
  if with_h0:
    inputs["h0"] = rng.normal(size=(BATCH, HEADS, DK, DV))
  return inputs, flags



@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", FORWARD_IMPLS)
def test_forward_matches_oracle(impl, case):
  inputs, flags = setup(**CASES[case])
  arrays = to_jax(inputs)
  # Under jit: one compilation costs far less than dispatching every operation on its own.
  attention = jax.jit(functools.partial(linear_attention, **flags, impl=impl, chunk_size=CHUNK))
  got = attention(**arrays)
  want = oracle(**to_numpy(arrays), **flags)
  if flags.get("return_state"):
    (got, s), (want, want_s) = got, want
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
  assert got.dtype == jnp.float32 and got.shape == inputs["v"].shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
def test_bfloat16_inputs_accumulate_in_float32(impl):
  inputs, flags = setup(**CASES["reverse_h0_state_per_channel"])
  arrays = to_jax(inputs, jnp.bfloat16)
  attention = jax.jit(functools.partial(linear_attention, **flags, impl=impl, chunk_size=CHUNK))
  o, s = attention(**arrays)
  want_o, want_s = oracle(**to_numpy(arrays), **flags)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(o, np.float64), want_o, rtol=2e-2, atol=2e-2)
  # bf16 values are exact in float32, so a float32 state matches the oracle to float32 precision.
  np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay, reverse", [("token", False), ("channel", True), ("head", False)])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_oracle_finite_differences(impl, reverse, decay):
  inputs, flags = setup(decay=decay, with_h0=True, reverse=reverse, return_state=True, seed=1)
  assert_gradients_match_oracle(functools.partial(linear_attention, impl=impl, chunk_size=CHUNK), oracle, inputs, flags, seed=2)


@pytest.mark.parametrize("decay", ("token", "channel"))
def test_chunked_is_stable_under_strong_decay_over_long_chunks(decay):
  # Cumulative log-decays reach -3200 within a chunk, so exp(-c) of any one of them alone would
  # overflow; only exponentials of differences stay finite.
  inputs, flags = setup(length=200, decay=decay, with_h0=True, decay_range=(-50.0, -20.0),
                        return_state=True)
  w = np.random.default_rng(3).normal(size=inputs["v"].shape)

  def run(impl):
    def loss(arrays):
      o, s = linear_attention(**arrays, **flags, impl=impl, chunk_size=64)
      return (o * w).sum() + s.sum(), (o, s)
    return jax.jit(jax.grad(loss, has_aux=True))(to_jax(inputs))

  for ref, chunked in zip(jax.tree.leaves(run("reference")), jax.tree.leaves(run("chunked"))):
    assert np.all(np.isfinite(chunked))
    np.testing.assert_allclose(chunked, ref, rtol=1e-4, atol=1e-4)


def test_unknown_impl_lists_available_ones():
  inputs, _ = setup()
  expected = (r"impl must be one of \('auto', 'reference', 'associative', 'chunked', 'pallas'\), "
              r"got 'triton'")
  with pytest.raises(ValueError, match=expected):
    linear_attention(**to_jax(inputs), impl="triton")


BAD_ARGS = {
    "q": dict(q=np.zeros((BATCH, 7, HEADS))),
    "k": dict(k=np.zeros((BATCH, 7, HEADS, DK + 1))),
    "v": dict(v=np.zeros((BATCH, 6, HEADS, DV))),
    "log_decay": dict(log_decay=np.zeros((BATCH, 7))),
    "h0": dict(h0=np.zeros((BATCH, HEADS, DV, DK))),
    "chunk_size": dict(chunk_size=0),
}


@pytest.mark.parametrize("name", BAD_ARGS)
def test_bad_argument_names_it(name):
  inputs, _ = setup()
  with pytest.raises(ValueError, match=rf"^{name} must") as error:
    linear_attention(**{**inputs, **BAD_ARGS[name]})
  assert "\n" not in str(error.value)
