"""A jaxformer GPT-2 as a model of EleutherAI's lm-eval harness, registered as ``jaxformer``.

    import jaxformer.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="jaxformer", model_args={"pretrained": "ckpt/gpt2"}, tasks=["hellaswag"])

(``jaxformer eval lm-eval`` does this.) ``pretrained``: a jaxformer checkpoint or training run, a
Hugging Face directory or hub id. The three request types, as lm-eval's ``hf`` model serves them:

* ``loglikelihood``: lm-eval's :class:`~lm_eval.api.model.TemplateLM` tokenizes (context +
  continuation together, the context's trailing spaces moved to the continuation; an empty context
  becomes ``<|endoftext|>``); :mod:`jaxformer.eval.scoring` scores the continuation tokens in batches
  of ``batch_size`` rows with bucketed lengths (left truncation to ``n_positions + 1``).
* ``loglikelihood_rolling``: the document's log-likelihood over lm-eval's disjoint windows
  (``get_rolling_token_windows`` with ``context_len=1`` and ``make_disjoint_window``): windows of
  ``n_positions`` tokens, the first one after ``<|endoftext|>``, each token predicted once.
* ``generate_until``: :func:`jaxformer.gpt2.generate.generate` (greedy unless ``do_sample``),
  the context left-truncated to leave room for ``max_gen_toks``, the text cut at the first stop string.
"""

import warnings

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from jaxformer.eval import scoring
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.gpt2.tokenizer import GPT2Tokenizer


@register_model("jaxformer")
class JaxformerLM(TemplateLM):
    """lm-eval model arguments: ``pretrained`` (required), ``batch_size`` (rows per batch, default
    16; ``auto`` means the default), ``max_gen_toks`` (default 256). ``max_batch_size`` and
    ``device``, which lm-eval passes to every model, are ignored: JAX places the model itself."""

    def __init__(self, pretrained: str, batch_size: int | str | None = 16, max_gen_toks: int = 256,
                 max_batch_size=None, device=None):
        super().__init__()
        self.config, self.params, tokenizer = load_pretrained(pretrained, weights="float", scan_layers=False)
        self.tokenizer = tokenizer or GPT2Tokenizer.gpt2()
        self.batch_size = 16 if batch_size in (None, "auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.config.n_positions

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ``((context, continuation), context tokens, continuation tokens)``."""
        logprob, _, greedy = scoring.loglikelihoods(self.params, self.config, [(c, t) for _, c, t in requests],
                                                    self.batch_size)
        return [(float(lp), bool(g)) for lp, g in zip(logprob, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for w in lm_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                        self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        logprob, _, _ = scoring.loglikelihoods(self.params, self.config, windows, self.batch_size)
        totals = [0.0] * len(requests)
        for i, lp in zip(owner, logprob):
            totals[i] += float(lp)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings run together, ``batch_size`` at a time."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for index in groups.values():
            for start in range(0, len(index), self.batch_size):
                chunk = index[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
        new = min(kwargs.pop("max_gen_toks"), self.max_length - 1)
        sample = bool(kwargs.get("do_sample"))
        if sample and not kwargs.get("temperature"):
            warnings.warn("do_sample without a temperature: decoding greedily")
            sample = False
        prompts = [self.tok_encode(c)[-(self.max_length - new):] or [self.eot_token_id] for c in contexts]
        outs = generate(self.params, self.config, prompts, max_new_tokens=new, greedy=not sample,
                        temperature=float(kwargs.get("temperature") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                        top_p=float(kwargs.get("top_p") or 1.0))
        texts = [self.tokenizer.decode(o[:o.index(self.eot_token_id)] if self.eot_token_id in o else o)
                 for o in outs]
        return [postprocess_generated_text(t, until, None) for t in texts]
