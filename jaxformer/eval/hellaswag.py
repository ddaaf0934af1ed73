"""HellaSwag, scored as llm.c (``dev/data/hellaswag.py``) and nanoGPT's ``hellaswag.py`` do.

Each item is a context and 4 endings, one of them right (``label``). Ending ``j`` is scored on the
row ``tokenize(ctx) + tokenize(" " + endings[j])``: its loss is the cross-entropy summed over the
ending's tokens only. ``acc`` picks the ending with the lowest summed loss, ``acc_norm`` the one
with the lowest mean (per-token) loss: the figure llm.c reports. (lm-eval's ``hellaswag`` task
differs: it cleans the context, tokenizes context and ending together and normalises by characters.)

The data: the official validation file, ``hellaswag_val.jsonl`` (10,042 items, one JSON object a
line with ``ctx``, ``endings``, ``label``, ...), found by :func:`jaxformer.data.datasets.locate`.

Shapes: the 4 endings of every item are requests of :mod:`jaxformer.eval.scoring`, sorted by length
and packed into batches of ``4 * batch`` rows, each padded to 16, 24, 32, 48, 64, 96, ... tokens.
Static per program: the config, the rows, the length bucket; so the 10,042 items compile a few
programs on the first :meth:`HellaSwag.evaluate`, and every later one (in a training loop) reuses them.
"""

import json
from pathlib import Path

import numpy as np

from jaxformer.data import datasets
from jaxformer.errors import InputError
from jaxformer.eval import scoring
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.tokenizer import GPT2Tokenizer

ENDINGS = 4



def read_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (default: all) items of a HellaSwag JSONL file, each ``{"ctx": str,
    "endings": [4 str], "label": int}``; a bad line is an InputError naming ``file:line``."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse(line, f"{path}:{number}"))
    if not items:
        raise InputError(f"{path}: no items")
    return items


def _parse(line: str, where: str) -> dict:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object")
    for key in ("ctx", "endings", "label"):
        if key not in raw:
            raise InputError(f"{where}: no field {key!r}")
    ctx, endings, label = raw["ctx"], raw["endings"], raw["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise InputError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) and e for e in endings)):
        raise InputError(f"{where}: 'endings' must be a list of {ENDINGS} non-empty strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the Hugging Face copy stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < ENDINGS:
        raise InputError(f"{where}: 'label' must be an integer in [0, {ENDINGS}), not {raw['label']!r}")
    return dict(ctx=ctx, endings=endings, label=label)


def load_items(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """:func:`read_items` of ``path``, or of the validation file found (or downloaded) by
    :func:`~jaxformer.data.datasets.locate`."""
    return read_items(datasets.locate("hellaswag", path), limit)


class HellaSwag:
    """HellaSwag items tokenized and packed once; :meth:`evaluate` scores params.

        hs = HellaSwag(load_items(), GPT2Tokenizer.gpt2(), config)
        hs.evaluate(params)   # {"hellaswag_acc": ..., "hellaswag_acc_norm": ...}
    """

    def __init__(self, items: list[dict], tokenizer: GPT2Tokenizer, config: GPT2Config, batch: int = 8):
        """batch: items per batch (``4 * batch`` rows)."""
        contexts = tokenizer.encode_batch([it["ctx"] for it in items])
        endings = tokenizer.encode_batch([" " + e for it in items for e in it["endings"]])
        requests = [(contexts[i // ENDINGS], e) for i, e in enumerate(endings)]
        self.items, self.config = len(items), config
        self.labels = np.asarray([it["label"] for it in items])
        self.batches = scoring.pack(requests, config, ENDINGS * batch)

    def losses(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(float64[items, 4] summed loss, float64[items, 4] mean loss) of every ending."""
        logprob, count, _ = scoring.score(params, self.config, self.batches, ENDINGS * self.items)
        total = -logprob.reshape(self.items, ENDINGS)
        return total, total / count.reshape(self.items, ENDINGS)

    def evaluate(self, params) -> dict[str, float]:
        """``{"hellaswag_acc", "hellaswag_acc_norm"}``: the share of items whose lowest summed
        (mean) loss is the right ending's."""
        total, mean = self.losses(params)
        return dict(hellaswag_acc=float((total.argmin(1) == self.labels).mean()),
                    hellaswag_acc_norm=float((mean.argmin(1) == self.labels).mean()))
