"""GPT-2: config, Flax model, Hugging Face conversion, generation."""

from jaxformer.gpt2.config import GPT2Config, preset
from jaxformer.gpt2.model import GPT2, init_params

__all__ = ["GPT2", "GPT2Config", "init_params", "preset"]
