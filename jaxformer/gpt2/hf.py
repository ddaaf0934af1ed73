"""Hugging Face GPT-2 checkpoints <-> jaxformer params, both directions side by side.

HF ``Conv1D`` weights are stored (in, out), like a Flax ``Dense`` kernel, so only ``lm_head``
(a ``Linear``, (out, in)) is transposed. Per-layer tensors ``transformer.h.{i}.*`` are stacked on
a leading layer axis. ``attn.bias`` / ``attn.masked_bias`` are causal-mask buffers, not weights.
Safetensors are read without torch; ``pytorch_model.bin`` needs the optional torch extra.
"""

import json
from pathlib import Path

import jax
import numpy as np

from jaxformer.config import read_json
from jaxformer.errors import CheckpointError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import init_params, stack_layer_params, unstack_layer_params
from jaxformer.gpt2.quantize import to_float

# HF key (below "transformer.") -> path in the params tree. One table per direction is this table.
TOP_LEVEL = {
    "wte.weight": ("wte", "embedding"),
    "wpe.weight": ("wpe", "embedding"),
    "ln_f.weight": ("ln_f", "scale"),
    "ln_f.bias": ("ln_f", "bias"),
}
PER_LAYER = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
LM_HEAD = "lm_head.weight"  # [V, D], transposed to params["lm_head"] [D, V]; absent when tied
BUFFERS = ("attn.bias", "attn.masked_bias")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# --- reading files ---------------------------------------------------------------------------------

def resolve(src: str | Path) -> Path:
    """A local HF directory as is, or a hub id (e.g. ``gpt2``) downloaded through huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face GPT-2 directory)")
        return path
    if str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise FileNotFoundError(f"{src}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "merges.txt", "vocab.json"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(
            f"could not download {src!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If this machine "
            "is offline, pass a local directory holding config.json and model.safetensors instead.") from e


def read_hf_config(path: Path) -> dict:
    return read_json(path / "config.json")


def read_hf_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index_file = path / "model.safetensors.index.json"
        index = read_json(index_file)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file}: no weight_map")
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index_file} names {shard}, which is missing")
            state.update(_read_safetensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{path / 'pytorch_model.bin'} needs torch: pip install 'jaxformer[torch]'") from e
        try:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: unreadable ({e})") from e
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    raise CheckpointError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="flax") as f:  # the flax reader handles bfloat16
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


# --- HF -> jaxformer -------------------------------------------------------------------------------

def _expected_shapes(config: GPT2Config):
    return jax.eval_shape(lambda: init_params(config.replace(scan_layers=True), jax.random.key(0)))


def hf_to_params(state: dict[str, np.ndarray], config: GPT2Config):
    """HF ``GPT2LMHeadModel`` / ``GPT2Model`` state dict -> params tree (numpy, config.param_dtype),
    with layers stacked or not as ``config.scan_layers`` says."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    expected = _expected_shapes(config)
    params: dict = {}
    used = set()

    def put(path, value, key):
        target = expected
        for p in path:
            target = target[p]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(target.shape)} expected for params/{'/'.join(path)}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.asarray(value, dtype=config.param_dtype)

    def take(key):
        if key not in state:
            raise CheckpointError(f"missing key {key!r} in the checkpoint")
        used.add(key)
        return state[key]

    for key, path in TOP_LEVEL.items():
        put(path, take(key), key)
    for key, path in PER_LAYER.items():
        layers = [take(f"h.{i}.{key}") for i in range(config.n_layer)]
        if len({a.shape for a in layers}) > 1:
            raise CheckpointError(f"h.*.{key}: layers have different shapes {[a.shape for a in layers]}")
        put(("h",) + path, np.stack(layers), f"h.*.{key}")
    if config.tie_word_embeddings:
        used.add(LM_HEAD)  # tied: lm_head.weight, if stored, is wte
    else:
        put(("lm_head",), take(LM_HEAD).T, LM_HEAD)

    unexpected = sorted(k for k in state if k not in used and not k.endswith(BUFFERS))
    if unexpected:
        raise CheckpointError(f"unexpected keys in the checkpoint: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return params if config.scan_layers else unstack_layer_params(params, config.n_layer)


def load_hf(src: str | Path, **config_overrides) -> tuple[GPT2Config, dict]:
    """Config and params from a HF directory or hub id. config_overrides: e.g. dtype="bfloat16"."""
    path = resolve(src)
    config = GPT2Config.from_hf_dict(read_hf_config(path), str(path / "config.json"), **config_overrides)
    return config, hf_to_params(read_hf_weights(path), config)


# --- jaxformer -> HF -------------------------------------------------------------------------------

def params_to_hf(params, config: GPT2Config) -> dict[str, np.ndarray]:
    """Params tree -> ``GPT2LMHeadModel`` state dict (numpy); lm_head.weight only when untied.
    Low-precision decoding weights are converted back to float32 first."""
    params, config = to_float(params, config)
    if not config.scan_layers:
        params = stack_layer_params(params, config.n_layer)

    def get(path):
        node = params
        for p in path:
            node = node[p]
        return np.asarray(node)

    state = {f"transformer.{k}": get(p) for k, p in TOP_LEVEL.items()}
    for key, path in PER_LAYER.items():
        stacked = get(("h",) + path)
        for i in range(config.n_layer):
            state[f"transformer.h.{i}.{key}"] = stacked[i]
    if not config.tie_word_embeddings:
        state[LM_HEAD] = get(("lm_head",)).T
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def save_hf(dst: str | Path, config: GPT2Config, params, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer files) that ``from_pretrained`` loads."""
    from safetensors.numpy import save_file

    from jaxformer.gpt2.tokenizer import copy_tokenizer_files

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = params_to_hf(params, config)
    tmp = dst / "model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst)
    return dst
