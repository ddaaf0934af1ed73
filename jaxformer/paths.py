"""Where shared data lives: the ``JAXFORMER_DATA`` environment variable (``.ci/run`` sets it)."""

import os
from pathlib import Path

DATA_ENV = "JAXFORMER_DATA"


def data_dir() -> Path:
    """The data root from ``$JAXFORMER_DATA``; a clear error when it is unset or missing."""
    value = os.environ.get(DATA_ENV)
    if not value:
        raise RuntimeError(f"set {DATA_ENV} to the data directory (the one holding fra-eng/, gpt2-tokenizer/ "
                           "and tinyshakespeare/)")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={value}: no such directory")
    return path
