"""Shared fixtures: random-weight Hugging Face GPT-2 models saved with save_pretrained, and data paths.

Data come from ``$JAXFORMER_DATA`` (``.ci/run`` sets ``../shared/data``); when it is missing the
tests that need it fail with a message instead of skipping. Tests run the ``jaxformer`` verbs
in-process through ``jaxformer.commands.main(argv)``. Compiled programs go
to a persistent compilation cache in a temporary directory for the session (subprocesses inherit
it): the many tiny runs compile the same programs, and compiling dominates their time.
"""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxformer-tests-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest
import torch
import transformers

from jaxformer.data.datasets import DATA_ENV
from jaxformer.data.datasets import data_root as find_data_root

# name -> GPT2Config kwargs. "real" is the 124M shape; "flags" exercises the non-default options.
HF_CONFIGS = {
    "tiny": dict(n_embd=64, n_layer=3, n_head=4, n_positions=128, vocab_size=1000,
                 bos_token_id=999, eos_token_id=999, initializer_range=0.2),
    "flags": dict(n_embd=48, n_layer=3, n_head=3, n_positions=96, vocab_size=500, n_inner=80,
                  activation_function="gelu", layer_norm_epsilon=1e-6, scale_attn_weights=False,
                  scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, initializer_range=0.2),
    "relu": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=300,
                 activation_function="relu", bos_token_id=0, eos_token_id=0, initializer_range=0.3),
    "real": dict(initializer_range=0.02),
    # GPT-2's whole vocabulary in a small model: text prompts work (the server's tests).
    "small": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2),
}


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """``hf_dir(name, **save_kw)`` -> (directory, torch model in eval mode), built once per name."""
    built = {}

    def make(name: str, **save_kw):
        key = (name, json.dumps(save_kw, sort_keys=True))
        if key not in built:
            torch.manual_seed(0)
            config = transformers.GPT2Config(**HF_CONFIGS[name])
            config._attn_implementation = "eager"
            model = transformers.GPT2LMHeadModel(config).eval()
            path = tmp_path_factory.mktemp(f"hf-{name}")
            model.save_pretrained(path, **save_kw)
            built[key] = (Path(path), model)
        return built[key]

    return make


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    assert root is not None, f"set {DATA_ENV} to the data directory (.ci/run sets ../shared/data)"
    return root


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(data_root) -> Path:
    path = data_root / "gpt2-tokenizer"
    assert (path / "tokenizer.json").is_file(), f"GPT-2 tokenizer files missing under {path}"
    return path


@pytest.fixture(scope="session")
def translator_dir(tmp_path_factory):
    """A translator model directory as `jaxformer train translator` writes it (random tiny weights)."""
    import jax

    from jaxformer.train.checkpoints import save_pytree
    from jaxformer.translator import tokenizer as tk
    from jaxformer.translator.config import preset
    from jaxformer.translator.model import init_params

    d = tmp_path_factory.mktemp("translator")
    config = preset("tiny")
    config.save(d / "config.json")
    tk.train_tokenizer(["Hello world.", "Bonjour le monde."] * 10, config.vocab_size).save(str(d / "tokenizer.json"))
    save_pytree(d / "best", init_params(config, jax.random.key(0)))
    return d


@pytest.fixture(scope="session")
def gpt2_dir(hf_dir, tmp_path_factory):
    """A jaxformer GPT-2 checkpoint directory (the tiny HF model, converted)."""
    from jaxformer.gpt2.pretrained import load_pretrained, save_pretrained
    d = tmp_path_factory.mktemp("gpt2") / "ckpt"
    config, params, _ = load_pretrained(hf_dir("tiny")[0])
    save_pretrained(d, config, params)
    return d
