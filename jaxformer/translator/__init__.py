"""English→French translator: config, data, tokenizer, batching, Flax model, decoding, training."""

from jaxformer.translator.config import TranslatorConfig, preset
from jaxformer.translator.translate import TranslationPipeline
from jaxformer.translator.model import Translator, init_params

__all__ = ["Translator", "TranslatorConfig", "TranslationPipeline", "init_params", "preset"]
