"""jaxformer GPT-2 checkpoint directories, and loading whatever a user points at.

A jaxformer checkpoint directory holds ``config.json`` (:class:`GPT2Config`), ``params/`` (Orbax,
sealed) and the tokenizer files. :func:`load_pretrained` also takes a GPT-2 training run directory
(``jaxformer/commands/train_gpt2.py --out``: its best params, else its newest intact checkpoint's), a Hugging
Face directory or a hub id (converted on the fly). A LoRA run holds an adapter only: it loads as its
base (the run's ``init``) with the adapter merged in (:func:`jaxformer.gpt2.lora.merge`).
"""

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxformer.train.checkpoints import load_run_params, restore_pytree, save_pytree
from jaxformer.gpt2 import hf, lora, peft
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import init_params, stack_layer_params, unstack_layer_params
from jaxformer.gpt2.quantize import to_decoding, to_float
from jaxformer.gpt2.tokenizer import GPT2Tokenizer, copy_tokenizer_files, has_tokenizer


def is_jaxformer_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "params").is_dir() and (path / "config.json").is_file()


def is_training_run(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any((path / n).exists() for n in ("run.json", "best", "checkpoints"))


def save_pretrained(dst: str | Path, config: GPT2Config, params, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes config.json, params/ (atomically; layers always stacked) and the tokenizer files
    found in tokenizer_dir."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if not config.scan_layers:
        params, config = stack_layer_params(params, config.n_layer), config.replace(scan_layers=True)
    save_pytree(dst / "params", params)
    config.save(dst / "config.json")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst)
    return dst


def load_pretrained(src: str | Path, weights: str | None = None,
                    **config_overrides) -> tuple[GPT2Config, dict, GPT2Tokenizer | None]:
    """(config, params, tokenizer or None) from a jaxformer checkpoint or training run, a HF
    directory or a hub id.

    config_overrides, e.g. ``scan_layers=False`` (faster decoding on CPU), apply on top of the
    stored config; params are cast to the resulting ``param_dtype``. weights: ``"bfloat16"`` or
    ``"int8"`` converts float weights for decoding (:mod:`jaxformer.gpt2.quantize`), ``"float"``
    converts them back; None loads them as stored. Weights that do not fit the config are a
    CheckpointError naming the key and both shapes.
    """
    config, params, tokenizer = _load(src, **config_overrides)
    if weights == "float":
        params, config = to_float(params, config)
    elif weights is not None and weights != config.weights:
        params, config = to_decoding(params, config, weights)
    return config, params, tokenizer


def load_config(src: str | Path, **config_overrides) -> tuple[GPT2Config, GPT2Tokenizer | None]:
    """(config, tokenizer or None) of what :func:`load_pretrained` would load, without its weights."""
    if is_jaxformer_checkpoint(src) or is_training_run(src):
        path = Path(src)
        config = GPT2Config.load(path / "config.json").replace(**config_overrides)
    else:
        path = hf.resolve(src)
        config = GPT2Config.from_hf_dict(hf.read_hf_config(path), str(path / "config.json"), **config_overrides)
    return config, GPT2Tokenizer.from_dir(path) if has_tokenizer(path) else None


def _load(src, **config_overrides):
    if is_training_run(src) and peft.run_spec(src) is not None:
        return _load_lora_run(Path(src), **config_overrides)
    if is_jaxformer_checkpoint(src) or is_training_run(src):
        path = Path(src)
        config = GPT2Config.load(path / "config.json").replace(**config_overrides)
        stored = config.replace(scan_layers=True)
        like = jax.eval_shape(lambda: init_params(stored, jax.random.key(0)))
        if is_jaxformer_checkpoint(path):
            params = restore_pytree(path / "params", like)
        else:
            params = load_run_params(path, like)
        if not config.scan_layers:
            params = unstack_layer_params(params, config.n_layer)
    else:
        path = hf.resolve(src)
        config, params = hf.load_hf(path, **config_overrides)
        params = jax.tree.map(jnp.asarray, params)
    tokenizer = GPT2Tokenizer.from_dir(path) if has_tokenizer(path) else None
    return config, params, tokenizer


def _load_lora_run(path: Path, **config_overrides):
    """A LoRA run as its base with the adapter merged in (float weights)."""
    base_config, base, _ = load_pretrained(peft.run_base(path), weights="float", scan_layers=True)
    spec, adapter = peft.load_adapter(path, base_config)
    params, _ = lora.merge(base, base_config, adapter, spec)
    config = GPT2Config.load(path / "config.json").replace(weights="float", **config_overrides)
    params = jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params)
    if not config.scan_layers:
        params = unstack_layer_params(params, config.n_layer)
    return config, params, GPT2Tokenizer.from_dir(path) if has_tokenizer(path) else None
