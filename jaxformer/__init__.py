"""jaxformer: pure-functional JAX/Flax GPT-2 and an English-French translator."""
