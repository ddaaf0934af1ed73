"""Where data sets live, resolved in one place, the same way for every model and script.

A data set is taken from, in order: an explicit path; ``$JAXFORMER_DATA/<its relative path>``; the
user cache ``$XDG_CACHE_HOME/jaxformer/<its relative path>`` (``~/.cache`` by default); else it is
downloaded into the cache, and offline the error says where to put the file. No other module reads
data locations from the environment. (The GPT-2 tokenizer ships inside the package:
:func:`jaxformer.gpt2.tokenizer.GPT2Tokenizer.gpt2`.)
"""

import dataclasses
import os
import sys
import urllib.request
from pathlib import Path

from jaxformer.errors import InputError

DATA_ENV = "JAXFORMER_DATA"


@dataclasses.dataclass(frozen=True)
class Dataset:
    relative: str  # path under the data root and the cache
    url: str
    about: str


DATASETS = {
    "fra-eng": Dataset("fra-eng/fra-eng.zip", "https://www.manythings.org/anki/fra-eng.zip",
                       "English-French sentence pairs from Tatoeba via manythings.org (CC-BY 2.0)"),
    "tinyshakespeare": Dataset(
        "tinyshakespeare/input.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "1.1 MB of Shakespeare's plays (public domain)"),
    "hellaswag": Dataset("hellaswag/hellaswag_val.jsonl",
                         "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                         "the HellaSwag validation set, 10,042 items, from github.com/rowanz/hellaswag (MIT)"),
}


def data_root() -> Path | None:
    """``$JAXFORMER_DATA`` as a directory, None when unset; an InputError when it names no directory."""
    value = os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InputError(f"{DATA_ENV}={value}: no such directory")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxformer"


def locate(name: str, path: str | Path | None = None, download: bool = True) -> Path:
    """The file of data set ``name`` (a key of :data:`DATASETS`), found as the module docstring says."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return path
    dataset = DATASETS[name]
    root = data_root()
    if root is not None:
        path = root / dataset.relative
        if not path.is_file():
            raise InputError(f"{DATA_ENV}={root} holds no {dataset.relative}; put the file there or unset {DATA_ENV}")
        return path
    cached = cache_dir() / dataset.relative
    if cached.is_file():
        return cached
    if not download:
        raise InputError(f"data set {name!r} not found: pass its path, set {DATA_ENV}, or put it at {cached}")
    print(f"downloading {dataset.url} to {cached}", file=sys.stderr)
    try:
        request = urllib.request.Request(dataset.url, headers={"User-Agent": "Mozilla/5.0 (jaxformer)"})
        with urllib.request.urlopen(request, timeout=60) as r:
            payload = r.read()
    except OSError as e:
        raise InputError(
            f"data set {name!r} ({dataset.about}) is not on this machine and could not be downloaded from "
            f"{dataset.url} ({e}). Pass its path, or set {DATA_ENV} to a directory holding {dataset.relative}, "
            f"or put the file at {cached}.") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.part")  # processes sharing a cache do not collide
    tmp.write_bytes(payload)
    tmp.replace(cached)
    return cached
