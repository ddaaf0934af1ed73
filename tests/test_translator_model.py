"""The Flax translator against torch.nn.Transformer holding the same weights, and its KV cache."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxformer.translator.config import preset
from jaxformer.translator.model import Translator, init_params, sinusoidal
from jaxformer.translator.torch_model import from_flax

SRC = np.array([[5, 6, 7, 8, 2, 0], [9, 10, 2, 0, 0, 0], [11, 2, 0, 0, 0, 0]])
TGT = np.array([[1, 5, 6, 7, 0], [1, 9, 3, 4, 8], [1, 12, 0, 0, 0]])


def test_sinusoidal_matches_float64_formula():
    pos, d = np.arange(7), 16
    ref = np.zeros((7, d))
    ref[:, 0::2] = np.sin(pos[:, None] / 10000 ** (np.arange(0, d, 2) / d))
    ref[:, 1::2] = np.cos(pos[:, None] / 10000 ** (np.arange(0, d, 2) / d))
    np.testing.assert_allclose(np.asarray(sinusoidal(jnp.asarray(pos), d)), ref, atol=1e-5)


@pytest.mark.parametrize("pre_ln,tie,act", [(True, True, "relu"), (False, False, "gelu"), (True, False, "relu")])
def test_logits_match_torch_transformer(pre_ln, tie, act):
    config = preset("tiny").replace(pre_ln=pre_ln, tie_embeddings=tie, activation=act)
    params = init_params(config, jax.random.PRNGKey(1))
    ours = np.asarray(Translator(config).apply({"params": params}, SRC, TGT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = from_flax(params, config).eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor(SRC), torch.tensor(TGT)).numpy()
    valid = TGT != 0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_cached_steps_equal_full_forward_and_padding_is_inert():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(2))
    model = Translator(config)
    full = np.asarray(model.apply({"params": params}, SRC, TGT))
    cache = model.apply({"params": params}, SRC, 8, method=model.init_cache)
    for t in range(TGT.shape[1]):
        logits, cache = model.apply({"params": params}, jnp.asarray(TGT[:, t]), cache, method=model.decode_step)
        rows = TGT[:, t] != 0
        np.testing.assert_allclose(np.asarray(logits)[rows], full[rows, t], atol=1e-5, rtol=1e-5)
    wider = np.pad(SRC, ((0, 0), (0, 5)))  # more source padding changes nothing
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, wider, TGT)), full, atol=1e-5)
