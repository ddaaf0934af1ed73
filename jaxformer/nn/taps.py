"""Look inside the models and intervene: named points ("taps") where intermediates are captured and
edited, for GPT-2 and the translator alike, inside ``jit``.

A tap is one line in a model, ``x = tap(self, "resid_pre", x)``. It uses two Flax collections:

* ``intermediates``: the value is ``sow``n there. Flax keeps it only when the collection is mutable,
  so a call that captures nothing is the plain model; under ``jit`` the values that are not
  selected are dead code, so capturing costs what is captured (``scripts/bench_taps.py``), with
  one exception: while anything is captured, attention computes its probabilities explicitly
  instead of through the fused kernel (equal within float rounding).
* ``interventions``: a read-only variable collection passed in next to ``params``. Where it holds
  an entry for the tap, the value is edited, ``x = where(set_mask, set, x) * scale + add`` (every key
  optional, numpy broadcasting: a steering vector ``[D]`` against ``[b, t, D]``, a head mask
  ``[H, 1]`` against per-head outputs ``[b, t, H, d]``). Edit values are traced: changing which head
  is ablated does not recompile.

Both are keyed like the params (module path, then the tap's name); inside ``nn.scan`` they map over
the layer axis, so a layer's entry is a slice of a stacked array. :func:`apply` hides the two
layouts (scanned ``h`` or unrolled ``h_0 .. h_{L-1}``, the translator's ``enc_i`` / ``dec_i``):
captures come back and edits go in by flat name with layers stacked first, e.g. ``"h/attn/pattern"``
``[L, b, H, q, k]``, ``"dec/cross_attn/pattern"`` ``[L, b, H, T, S]``.

Why Flax's own mechanisms rather than hooks: ``sow`` gives capture and its zero cost for free and
works under ``nn.scan`` and ``nn.remat``; a variable collection gives edits that follow the params'
structure and are sliced per layer by the scan. ``capture_intermediates`` only sees module outputs
(not attention probabilities, per-head outputs or the residual between attention and MLP), and
``nn.intercept_methods`` sees the same boundaries once per trace (one scanned body for all layers),
so neither can name these points.

Names (see ``docs/inspect.md``): GPT-2 ``embed``, ``pos_embed``, ``h/{resid_pre, resid_mid,
resid_post, attn_out, mlp_out}``, ``h/attn/{q, k, v, pattern, z}``, ``h/mlp/post``, ``ln_final``;
the translator ``{enc,dec}_tok_embed``, ``{enc,dec}_pos_embed``, ``enc/{resid_pre, resid_mid,
resid_post}``, ``dec/{resid_pre, resid_mid, resid_cross, resid_post}``, ``enc/attn/*``,
``dec/{self_attn, cross_attn}/*`` (``q, pattern, z``), ``{enc,dec}/ff/post``, ``enc_out``,
``dec_out`` (the stacks' outputs).
"""

import fnmatch
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError

CAPTURE, EDITS = "intermediates", "interventions"
EDIT_KEYS = ("set", "set_mask", "scale", "add")
_LAYER = re.compile(r"^(.*)_(\d+)$")  # an unrolled layer module: h_3, enc_0, dec_11


def tap(module: nn.Module, name: str, x):
    """The named point ``name`` of ``module``: applies the edit held for it, sows the result."""
    if module.has_variable(EDITS, name):  # decided when tracing: no edit, no operation
        e = module.get_variable(EDITS, name)
        if "set" in e:
            x = jnp.where(e.get("set_mask", True), jnp.asarray(e["set"], x.dtype), x)
        if "scale" in e:
            x = x * jnp.asarray(e["scale"], x.dtype)
        if "add" in e:
            x = x + jnp.asarray(e["add"], x.dtype)
    module.sow(CAPTURE, name, x, init_fn=lambda: None, reduce_fn=lambda _, v: v)
    return x


def tapped(module: nn.Module, name: str) -> bool:
    """Whether this call captures or edits taps of ``module`` (then a value that fused code would
    not materialise, such as attention probabilities, must be computed)."""
    return module.is_mutable_collection(CAPTURE) or module.has_variable(EDITS, name)


# --- layouts: flat names with stacked layers <-> the model's trees ------------------------------------

def flatten(tree) -> dict[str, object]:
    """``{"h": {"attn": {"z": a}}}`` -> ``{"h/attn/z": a}``."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]}


def _layer_of(name: str) -> tuple[str, int | None]:
    """``"h_3/attn/z"`` -> (``"h/attn/z"``, 3); a name outside unrolled layers -> (name, None)."""
    head, _, rest = name.partition("/")
    m = _LAYER.match(head)
    return (f"{m.group(1)}/{rest}", int(m.group(2))) if m and rest else (name, None)


def stack_captures(flat: dict) -> dict:
    """``{"h_0/x": a, "h_1/x": b}`` -> ``{"h/x": stack([a, b])}`` (scanned names are already stacked)."""
    groups, out = {}, {}
    for name, value in flat.items():
        stacked, layer = _layer_of(name)
        if layer is None:
            out[name] = value
        else:
            groups.setdefault(stacked, {})[layer] = value
    for name, layers in groups.items():
        out[name] = jnp.stack([layers[i] for i in range(len(layers))])
    return out


def _layer_modules(params) -> dict[str, int]:
    """Unrolled layer groups in ``params``: ``{"h": 12}`` or ``{"enc": 3, "dec": 3}``."""
    counts = {}
    for key in params:
        m = _LAYER.match(key)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def edits_tree(edits: dict, params) -> dict:
    """Flat edits ``{"h/attn/z": {"scale": [L, ...]}}`` as the model's ``interventions`` tree."""
    unrolled = _layer_modules(params)
    tree: dict = {}

    def put(path: list[str], value):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value

    for name, edit in edits.items():
        unknown = set(edit) - set(EDIT_KEYS)
        if unknown or not edit:
            raise InputError(f"edit of {name!r}: keys must be among {EDIT_KEYS}, got {sorted(edit)}")
        head, _, rest = name.partition("/")
        if head in unrolled and rest:
            for i in range(unrolled[head]):
                put([f"{head}_{i}", *rest.split("/")], {k: v[i] for k, v in edit.items()})
        else:
            put(name.split("/"), dict(edit))
    return tree


def select(flat: dict, capture) -> dict:
    """The captured values whose names match ``capture``: names or glob patterns (``"h/attn/*"``),
    ``"*"`` for all."""
    patterns = [capture] if isinstance(capture, str) else list(capture)
    return {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


# --- the call ------------------------------------------------------------------------------------------

def apply(model: nn.Module, params, *args, capture=(), edits: dict | None = None, method=None, **kwargs):
    """``model.apply`` with taps: returns ``(output, captured)``.

    capture: tap names or glob patterns to return (``()``: none, the plain model); captured values
      come back flat by name, layers stacked first. Use it inside ``jax.jit`` with ``capture``
      static: what is not selected is not computed beyond the plain forward pass.
    edits: ``{name: {"set", "set_mask", "scale", "add"}}`` by the same names, layer-stacked
      ``[L, ...]`` for per-layer taps (a layer left alone: scale 1, add 0, set_mask False); see
      :func:`ablate_heads`, :func:`steer`, :func:`patch`, :func:`merge`. A name that matches no tap
      is an InputError.
    """
    variables = with_edits(model, params, edits, *args, method=method, **kwargs)
    if not capture:
        return model.apply(variables, *args, method=method, **kwargs), {}
    out, state = model.apply(variables, *args, method=method, mutable=[CAPTURE], **kwargs)
    return out, select(stack_captures(flatten(state.get(CAPTURE, {}))), capture)


def with_edits(model: nn.Module, params, edits: dict | None, *args, method=None, **kwargs) -> dict:
    """The variables for ``model.apply``: ``params``, and ``edits`` (flat names, see :func:`apply`)
    as the ``interventions`` collection, after checking that each name is a tap of ``model``
    called on ``args`` (an InputError listing the taps otherwise)."""
    if not edits:
        return {"params": params}

    def run(p, *a):
        return model.apply({"params": p}, *a, method=method, mutable=[CAPTURE], **kwargs)[1].get(CAPTURE, {})
    names = {_layer_of(n)[0] for n in flatten(jax.eval_shape(run, params, *args))}
    missing = sorted(set(edits) - names)
    if missing:
        raise InputError(f"no tap named {missing}; the taps are {sorted(names)}")
    return {"params": params, EDITS: edits_tree(edits, params)}


# --- edits --------------------------------------------------------------------------------------------

def ablate_heads(n_layer: int, n_head: int, heads, *, how: str = "zero", mean=None, site: str = "h/attn/z",
                 factor: float = 0.0) -> dict:
    """Edits that remove or scale attention heads, given as ``[(layer, head), ...]``: their slice of
    the per-head outputs ``z`` (the input to the attention output projection).

    how: ``"zero"`` (z = 0), ``"scale"`` (z *= factor) or ``"mean"`` (z = ``mean``, the head's mean
    output over some reference batch, ``[L, H, head_dim]``, e.g. ``captured["h/attn/z"].mean((1, 2))``).
    site: the per-head tap (``dec/cross_attn/z`` etc. for the translator).
    """
    mask = np.zeros((n_layer, n_head, 1), bool)
    for layer, head in heads:
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise InputError(f"head {layer}.{head} does not exist: layers 0..{n_layer - 1}, heads 0..{n_head - 1}")
        mask[layer, head] = True
    if how == "zero":
        return {site: {"scale": jnp.asarray(~mask, jnp.float32)}}
    if how == "scale":
        return {site: {"scale": jnp.asarray(np.where(mask, factor, 1.0), jnp.float32)}}
    if how == "mean":
        if mean is None:
            raise InputError("mean ablation needs the heads' mean outputs (mean=[L, H, head_dim])")
        return {site: {"set": jnp.asarray(mean), "set_mask": jnp.asarray(mask)}}
    raise InputError(f"how={how!r}: use zero, scale or mean")


def steer(n_layer: int, layer: int, vector, site: str = "h/resid_pre", alpha: float = 1.0) -> dict:
    """Adds ``alpha * vector`` (``[D]``) to the residual stream ``site`` at ``layer`` (every position,
    prefill and decoding steps alike)."""
    vector = jnp.asarray(vector, jnp.float32)
    add = jnp.zeros((n_layer,) + vector.shape, jnp.float32).at[layer].set(alpha * vector)
    return {site: {"add": add}}


def patch(values, layers, site: str = "h/resid_pre") -> dict:
    """Replaces ``site`` at ``layers`` by ``values`` (``[L, b, t, ...]``, e.g. another run's capture
    of the same site); the other layers keep their own values."""
    n = values.shape[0]
    mask = np.zeros((n,) + (1,) * (values.ndim - 1), bool)
    mask[list(np.atleast_1d(layers))] = True
    return {site: {"set": jnp.asarray(values), "set_mask": jnp.asarray(mask)}}


def merge(*edits: dict) -> dict:
    """One edits dict from several; two edits of the same site may not use the same key."""
    out: dict = {}
    for e in edits:
        for name, keys in e.items():
            clash = set(out.get(name, {})) & set(keys)
            if clash:
                raise InputError(f"two edits of {name!r} both set {sorted(clash)}")
            out[name] = {**out.get(name, {}), **keys}
    return out
