"""LoRA adapters on disk: PEFT's directories both ways, and jaxformer LoRA runs.

A PEFT directory holds ``adapter_config.json`` (``LoraConfig``) and ``adapter_model.safetensors``
with, per layer ``i`` and adapted module ``M`` (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``)::

    base_model.model.transformer.h.{i}.{M}.lora_A.weight  [r, in]   = lora_a[i].T
    base_model.model.transformer.h.{i}.{M}.lora_B.weight  [out, r]  = lora_b[i].T

(:mod:`jaxformer.gpt2.lora` for the layout and the arithmetic). A jaxformer LoRA run
(``jaxformer train gpt2 --lora-rank R``) holds the adapter as its params (``best/``, checkpoints)
and its :class:`~jaxformer.gpt2.lora.LoRASpec` as the ``lora_*`` fields of ``run.json``.
"""

import json
import re
from pathlib import Path

import numpy as np

from jaxformer.config import read_json
from jaxformer.errors import CheckpointError, InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.lora import TARGETS, LoRASpec, abstract, build, shapes

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MODULES = {target: ".".join(path) for target, path in TARGETS.items()}  # c_attn -> attn.c_attn
KEY = re.compile(r"^base_model\.model\.transformer\.h\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")
# LoraConfig settings that change what an adapter computes beyond LoRA matrices: value -> allowed.
UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
               "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None,),
               "lora_bias": (False, None), "trainable_token_indices": (None,), "target_parameters": (None, []),
               "layer_replication": (None,)}


def key(layer: int, target: str, which: str) -> str:
    return f"base_model.model.transformer.h.{layer}.{MODULES[target]}.lora_{which}.weight"


def to_state(adapter: dict, spec: LoRASpec) -> dict[str, np.ndarray]:
    """A stacked adapter as PEFT's state dict (float32, contiguous)."""
    state = {}
    for target in spec.targets:
        module, proj = TARGETS[target]
        a, b = (np.asarray(adapter["h"][module][proj][k], np.float32) for k in ("lora_a", "lora_b"))
        for i in range(a.shape[0]):
            state[key(i, target, "A")] = np.ascontiguousarray(a[i].T)
            state[key(i, target, "B")] = np.ascontiguousarray(b[i].T)
    return state


def from_state(state: dict[str, np.ndarray], config: GPT2Config, spec: LoRASpec, source: str) -> dict:
    """PEFT's state dict as a stacked adapter for a base of ``config``; a key that is not a GPT-2
    LoRA weight, a missing layer or a shape that does not fit is an error naming it."""
    want = {key(i, t, w) for t in spec.targets for i in range(config.n_layer) for w in "AB"}
    stray = sorted(set(state) - want)
    if stray:
        raise CheckpointError(f"{source}: {stray[0]} is not a LoRA weight of a GPT-2 with {config.n_layer} layers "
                              f"(expected keys like {key(0, spec.targets[0], 'A')})")
    expected = {}
    for target, ((n_in, r), (_, n_out)) in shapes(config, spec).items():
        for i in range(config.n_layer):
            expected[key(i, target, "A")], expected[key(i, target, "B")] = (r, n_in), (n_out, r)
    for k in sorted(state):  # shapes first: an adapter of another base says so, whatever its depth
        if tuple(state[k].shape) != expected[k]:
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)}, the base (n_embd="
                                  f"{config.n_embd}, MLP width {config.inner_dim}) and rank {spec.rank} need "
                                  f"{expected[k]}")
    missing = sorted(want - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing {missing[0]} (the base has {config.n_layer} layers)")

    def per_target(target, _):
        return tuple(np.stack([np.asarray(state[key(i, target, w)], np.float32).T for i in range(config.n_layer)])
                     for w in "AB")
    return build(config, spec, per_target)


def read_spec(path: Path, state_keys=()) -> LoRASpec:
    """The :class:`LoRASpec` of PEFT's ``adapter_config.json`` in ``path``: the targets are the
    modules that the weights named ``state_keys`` adapt; ``target_modules``, when a list, must name
    GPT-2 projections only."""
    file = path / CONFIG_FILE
    cfg = read_json(file)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise InputError(f"{file}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
                         "only LORA adapters are supported")
    for name, allowed in UNSUPPORTED.items():
        if name in cfg and cfg[name] not in allowed:
            raise InputError(f"{file}: {name}={cfg[name]!r} is not supported (plain LoRA matrices only)")
    names = cfg.get("target_modules")
    suffixes = {s for m in MODULES.values() for s in (m, m.split(".")[1])}
    if isinstance(names, list) and any(n not in suffixes for n in names):
        bad = next(n for n in names if n not in suffixes)
        raise InputError(f"{file}: target_modules names {bad!r}, not a GPT-2 projection "
                         f"({', '.join(sorted(suffixes))}); is this an adapter for another model?")
    found = {m.group(2) for m in map(KEY.match, state_keys) if m}
    targets = tuple(t for t, m in MODULES.items() if m in found) or ("c_attn",)
    try:
        return LoRASpec(rank=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), targets=targets,
                        rslora=bool(cfg.get("use_rslora", False)), dropout=float(cfg.get("lora_dropout", 0.0)))
    except InputError as e:
        raise InputError(f"{file}: {e}") from None


def load_peft(path: str | Path, config: GPT2Config) -> tuple[LoRASpec, dict]:
    """(spec, stacked adapter) of a PEFT LoRA directory, for a base of ``config``."""
    from safetensors.numpy import load_file

    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} (an adapter saved with safe_serialization=False "
                              "must be saved again with safetensors)")
    try:
        state = load_file(weights)
    except Exception as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from e
    spec = read_spec(path, state)
    return spec, from_state(state, config, spec, str(weights))


def save_peft(dst: str | Path, adapter: dict, spec: LoRASpec, base: str | None = None) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel..., dst)`` loads; ``base``: the base model's
    name or path, recorded as ``base_model_name_or_path``."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=spec.rank,
                  lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                  fan_in_fan_out=True, bias="none", use_rslora=spec.rslora, use_dora=False, modules_to_save=None,
                  init_lora_weights=True, inference_mode=True)
    tmp = dst / (WEIGHTS_FILE + ".tmp")
    save_file(to_state(adapter, spec), tmp, metadata={"format": "pt"})
    tmp.replace(dst / WEIGHTS_FILE)
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


# --- jaxformer LoRA runs -------------------------------------------------------------------------

def run_spec(path: str | Path) -> LoRASpec | None:
    """The :class:`LoRASpec` of the training run in ``path`` (its ``run.json``), None when the run
    is not a LoRA run (or ``path`` holds no run)."""
    file = Path(path) / "run.json"
    if not file.is_file():
        return None
    run = read_json(file)
    if not isinstance(run, dict) or run.get("lora_rank") is None:
        return None
    return LoRASpec(rank=run["lora_rank"], alpha=float(run["lora_alpha"]), targets=tuple(run["lora_targets"]),
                    rslora=bool(run["lora_rslora"]), dropout=float(run["lora_dropout"]))


def run_base(path: str | Path) -> str:
    """The base model of the LoRA run in ``path`` (its ``init``, as given when it started)."""
    return read_json(Path(path) / "run.json")["init"]


def load_adapter(src: str | Path, config: GPT2Config) -> tuple[LoRASpec, dict]:
    """(spec, stacked adapter as numpy) from a PEFT directory or a jaxformer LoRA run, for a base
    of ``config``."""
    import jax

    from jaxformer.train.checkpoints import load_run_params

    path = Path(src)
    if (path / CONFIG_FILE).is_file():
        return load_peft(path, config)
    spec = run_spec(path)
    if spec is None:
        raise InputError(f"{src}: not a PEFT adapter ({CONFIG_FILE}) or a jaxformer LoRA run (run.json with lora_rank)")
    return spec, jax.tree.map(np.asarray, load_run_params(path, abstract(config, spec)))
