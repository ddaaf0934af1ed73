"""GPT-2 weights for decoding at memory speed: bfloat16, or int8 with a float32 scale per output.

Decoding one token at a time reads every weight once per step, so its speed is the bytes it reads.
With ``config.weights`` ``"bfloat16"`` or ``"int8"`` the Dense kernels are stored output-major,
``[out, in]``, in that type (int8: symmetric, ``w = q * scale[out]``, ``|q| <= 127``), and so is
the token embedding (which is also the tied LM head; int8: a scale per vocabulary row). Layer
norms, biases and position embeddings stay float32; activations, logits and softmax are float32.

:func:`project` is the one place that multiplies by such weights. Up to ``MATVEC_ROWS`` rows (a
decoding step, a short prompt) it is a convert-multiply-reduce over the output-major kernel, which
XLA:CPU fuses (a library reduction) so that the small weights are read once and never converted
as a whole; on this CPU a ``dot`` with bfloat16 operands is over ten times slower at one row, and
the ``[in, out]`` layout makes the reduction stride across memory. More rows use one matmul on the
weights converted to float32. Measurements: ``docs/decoding.md``.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError

WEIGHTS = ("float", "bfloat16", "int8")
MATVEC_ROWS = 64  # up to this many rows per call: the fused multiply-reduce; above: a matmul


def project(x, kernel, scale=None):
    """``x @ kernel.T`` for x float[..., K] and an output-major kernel [N, K] (bfloat16, or int8
    with ``scale`` float32[N]); float32[..., N]."""
    x = x.astype(jnp.float32)
    w = kernel.astype(jnp.float32)
    rows = math.prod(x.shape[:-1])
    if rows == 1:  # a vector: XLA vectorises this reduction well (with a leading 1 it does not)
        y = jnp.sum(w * x.reshape(-1), axis=-1).reshape(x.shape[:-1] + w.shape[:1])
    elif rows <= MATVEC_ROWS:  # as [rows, 1, K] x [N, K]: more leading axes crash XLA:CPU's library fusion
        y = jnp.sum(x.reshape(rows, 1, -1) * w, axis=-1).reshape(x.shape[:-1] + w.shape[:1])
    else:
        y = jnp.einsum("...k,nk->...n", x, w)
    return y if scale is None else y * scale


class LowPrecisionDense(nn.Module):
    """A Dense layer whose kernel is stored output-major in bfloat16 or int8 (``weights``)."""

    features: int
    weights: str

    @nn.compact
    def __call__(self, x):
        shape = (self.features, x.shape[-1])
        if self.weights == "int8":
            kernel = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        else:
            kernel, scale = self.param("kernel", nn.initializers.zeros, shape, jnp.bfloat16), None
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return project(x, kernel, scale) + bias


class LowPrecisionEmbed(nn.Module):
    """A token embedding stored in bfloat16 or int8 (a scale per row); also the tied LM head."""

    num_embeddings: int
    features: int
    weights: str

    def setup(self):
        shape = (self.num_embeddings, self.features)
        if self.weights == "int8":
            self.embedding = self.param("embedding", nn.initializers.zeros, shape, jnp.int8)
            self.scale = self.param("scale", nn.initializers.ones, (self.num_embeddings,), jnp.float32)
        else:
            self.embedding = self.param("embedding", nn.initializers.zeros, shape, jnp.bfloat16)
            self.scale = None

    def __call__(self, tokens):
        x = self.embedding[tokens].astype(jnp.float32)
        return x if self.scale is None else x * self.scale[tokens][..., None]

    def attend(self, x):
        """Logits float32[..., V] of hidden states x [..., D]."""
        # The barrier keeps XLA from sharing one float32 copy of the table between the lookup and
        # this product (a full extra write and read of the largest matrix at every step).
        return project(x, jax.lax.optimization_barrier(self.embedding), self.scale)


def _quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of w [N, K] (float64 math): (q int8[N, K], scale float32[N])."""
    w = np.asarray(w, np.float64)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def to_decoding(params, config, weights: str):
    """(params, config) with the Dense kernels and the token embedding stored as ``weights``
    (``"bfloat16"`` or ``"int8"``), from float params of any layer layout; ``"float"``: unchanged."""
    if weights not in WEIGHTS:
        raise InputError(f"weights={weights!r}: choose from {', '.join(WEIGHTS)}")
    if weights == "float" or config.weights == weights:
        return params, config
    if config.weights != "float":
        raise InputError(f"the model's weights are already {config.weights}; convert from float weights")
    if not config.tie_word_embeddings:
        raise InputError("low-precision decoding needs the tied LM head (tie_word_embeddings=true)")

    def convert(path, leaf):
        names = [getattr(k, "key", k) for k in path]
        leaf = np.asarray(jax.device_get(leaf), np.float32)
        if names[-1] == "kernel":  # [..., in, out] (stacked layers first) -> [..., out, in]
            w = np.swapaxes(leaf, -1, -2)
        elif names[-2:] == ["wte", "embedding"]:
            w = leaf
        else:
            return jnp.asarray(leaf)
        if weights == "bfloat16":
            return jnp.asarray(w, jnp.bfloat16)
        q, s = _quantize_rows(w.reshape(-1, w.shape[-1]))
        return {"q": jnp.asarray(q.reshape(w.shape)), "scale": jnp.asarray(s.reshape(w.shape[:-1]))}

    converted = jax.tree_util.tree_map_with_path(convert, params)
    return _split_scales(converted), config.replace(weights=weights)


def _split_scales(tree):
    """``{"kernel": {"q", "scale"}}`` -> ``{"kernel": q, "scale": scale}`` (the modules' names)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and set(value) == {"q", "scale"}:
            out[key], out["scale"] = value["q"], value["scale"]
        else:
            out[key] = _split_scales(value)
    return out


def to_float(params, config):
    """(params, config) back to float32 weights in Hugging Face's layout (int8 dequantized)."""
    if config.weights == "float":
        return params, config

    def restore(node: dict) -> dict:
        weight = node.get("kernel", node.get("embedding"))
        quantized = weight is not None and not isinstance(weight, dict) and weight.dtype == jnp.int8
        out = {}
        for key, value in node.items():
            if key == "scale" and quantized:
                continue
            if isinstance(value, dict):
                out[key] = restore(value)
                continue
            w = np.asarray(jax.device_get(value), np.float32)
            if key in ("kernel", "embedding") and quantized:
                w = w * np.asarray(node["scale"], np.float32)[..., None]
            out[key] = jnp.asarray(np.swapaxes(w, -1, -2) if key == "kernel" else w)
        return out
    return restore(params), config.replace(weights="float")
