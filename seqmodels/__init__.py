"""seqmodels: efficient sequence models in JAX/Flax NNX."""
