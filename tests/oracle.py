"""Helpers for checking kernels against float64 NumPy oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def to_jax(inputs, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in inputs.items()}


def to_numpy(inputs):
  return {k: np.asarray(v, np.float64) for k, v in inputs.items()}


def assert_gradients_match_oracle(kernel, oracle, inputs, flags, seed):
  """Checks jax.grad of kernel against central differences of oracle, for every input.

  Both return (output, final_state) under `flags`; the loss is a fixed random projection of both.
  The kernel runs in float64, where its only error is rounding, so the comparison can be tight.
  """
  rng = np.random.default_rng(seed)
  out, state = oracle(**inputs, **flags)
  w_out, w_state = rng.normal(size=out.shape), rng.normal(size=state.shape)

  def loss(fn, arrays):
    o, s = fn(**arrays, **flags)
    return (o * w_out).sum() + (s * w_state).sum()

  with jax.enable_x64(True):
    grads = to_numpy(jax.jit(jax.grad(functools.partial(loss, kernel)))(to_jax(inputs, jnp.float64)))

  eps = 1e-5
  for name, value in inputs.items():
    direction = rng.normal(size=value.shape)
    plus = loss(oracle, {**inputs, name: value + eps * direction})
    minus = loss(oracle, {**inputs, name: value - eps * direction})
    np.testing.assert_allclose(np.sum(grads[name] * direction), (plus - minus) / (2 * eps),
                               rtol=1e-6, atol=1e-8, err_msg=f"gradient with respect to {name}")
