import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxformer.nn.losses import cross_entropy
from jaxformer.train.optim import noam, warmup_cosine


def random_case(seed: int, shape: tuple[int, int], vocab: int, scale: float, keep: float):
    """float32 logits [*shape, vocab], int targets and a bool mask (True with probability ``keep``)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*shape, vocab)).astype(np.float32) * scale, rng.integers(0, vocab, shape),
            rng.random(shape) < keep)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_torch_and_float64(eps):
    logits, targets, mask = random_case(0, (3, 5), 11, 3.0, 0.7)
    loss, nll, n = cross_entropy(logits, targets, mask, eps)

    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(np.where(mask, targets, -100)).reshape(-1),
        ignore_index=-100, label_smoothing=eps, reduction="sum")
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    assert float(n) == mask.sum()

    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    q = (1 - eps) * np.eye(11)[targets] + eps / 11
    np.testing.assert_allclose(float(loss), (-(q * logp).sum(-1) * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(nll), (-np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(),
                               rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_gradient_matches_torch(eps):
    """The hand-written backward pass against torch autograd in float64, with both outputs used."""
    logits, targets, mask = random_case(1, (4, 6), 13, 2.0, 0.6)

    def f(x):
        loss, nll, _ = cross_entropy(x, targets, mask, eps)
        return 0.7 * loss + 0.3 * nll

    grad = jax.grad(f)(jnp.asarray(logits))

    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(np.where(mask, targets, -100)).reshape(-1)
    flat = x.reshape(-1, 13)
    ref = 0.7 * torch.nn.functional.cross_entropy(flat, t, ignore_index=-100, label_smoothing=eps, reduction="sum") \
        + 0.3 * torch.nn.functional.cross_entropy(flat, t, ignore_index=-100, reduction="sum")
    ref.backward()
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), atol=1e-6)
    assert not np.asarray(grad)[~mask].any()  # padding gets no gradient


def test_noam_formula():
    s = noam(256, 2000, factor=2.0)
    for step in (0, 10, 1999, 2000, 50_000):
        n = step + 1
        np.testing.assert_allclose(float(s(step)), 2.0 * 256**-0.5 * min(n**-0.5, n * 2000**-1.5), rtol=1e-6)
    assert float(s(1998)) < float(s(1999)) > float(s(2500))  # peak at the end of warm-up


def test_warmup_cosine_endpoints():
    s = warmup_cosine(1e-3, 10, 110, end_ratio=0.1)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose([float(s(10)), float(s(110)), float(s(500))], [1e-3, 1e-4, 1e-4], rtol=1e-5)
