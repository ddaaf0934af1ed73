"""The translator seen from inside: where each generated word looks in the source."""

import numpy as np

from jaxformer.nn import taps
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import pad_sources
from jaxformer.translator.translate import LENGTH_ALPHA, TranslationPipeline, output_len
from jaxformer.translator.model import Translator


def token_texts(tok, ids) -> list[str]:
    return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]


def cross_attention(pipeline: TranslationPipeline, sentence: str, beam_size: int = 1):
    """Translates ``sentence`` and returns (source tokens, generated tokens, attention maps
    float32[L, H, T, S]): row ``i`` is where the decoder looked in the source while producing
    generated token ``i`` (teacher-forced on the translation; the last row produced EOS)."""
    config, tok = pipeline.config, pipeline.tokenizer
    src_ids = [int(i) for i in tk.encode(tok, [sentence])[0][:config.max_len - 1]]
    src = pad_sources([np.asarray(src_ids)], 1, len(src_ids) + 1)
    out = pipeline.search(pipeline.params, src, beam_size=beam_size, max_len=output_len(config, src.shape[1]),
                          alpha=LENGTH_ALPHA)
    out = np.asarray(out)[0].tolist()
    out = out[:out.index(tk.EOS_ID) + 1] if tk.EOS_ID in out else [t for t in out if t != tk.PAD_ID]
    tgt_in = np.asarray([[tk.BOS_ID] + out[:-1]], np.int32)
    _, got = taps.apply(Translator(config), pipeline.params, src, tgt_in, capture="dec/cross_attn/pattern")
    maps = np.asarray(got["dec/cross_attn/pattern"][:, 0])  # [L, H, T, S]
    return token_texts(tok, src_ids) + ["</s>"], token_texts(tok, out[:-1]) + ["</s>"], maps
