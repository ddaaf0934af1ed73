"""The shared training core against float64 numpy: token-weighted gradient accumulation, and the
checkpoint bookkeeping both trainers rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformer.train.checkpoints import Checkpoints
from jaxformer.train.step import TrainState, make_train_step


def loss_fn(params, batch, key):
    """Squared error of a linear model summed over the unmasked tokens: (sum, (tokens, {"sq": sum}))."""
    err = batch["x"] @ params["w"] - batch["y"]
    mask = batch["mask"].astype(jnp.float32)
    total = (err**2 * mask).sum()
    return total, (mask.sum(), {"sq": total})


def test_accumulation_weights_micro_batches_by_tokens():
    """Micro-batches with 3 and 6 unmasked tokens: the update is the gradient of the per-token mean
    over all 9 tokens (not the mean of the two micro-batch means), as float64 numpy computes it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)  # [micro-batch, rows, tokens, features]
    y = rng.normal(size=(2, 2, 3)).astype(np.float32)
    mask = np.zeros((2, 2, 3), bool)
    mask[0, 0, :3] = True
    mask[1] = True
    w = rng.normal(size=4).astype(np.float32)
    state = TrainState.create({"w": jnp.asarray(w)}, optax.sgd(1.0), jax.random.PRNGKey(0))
    new, metrics = make_train_step(loss_fn, optax.sgd(1.0), grad_accum=2)(state, dict(x=x, y=y, mask=mask))

    xs, ys, m = x.reshape(-1, 4).astype(np.float64), y.reshape(-1).astype(np.float64), mask.reshape(-1)
    err = xs[m] @ w - ys[m]
    grad = 2 * xs[m].T @ err / m.sum()
    np.testing.assert_allclose(np.asarray(new.params["w"]), w - grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), (err**2).mean(), rtol=1e-5)
    assert float(metrics["tokens"]) == 9 and int(new.step) == 1


def test_checkpoints_best_lower_is_better_and_steps(tmp_path):
    ckpts = Checkpoints(tmp_path)
    for step, value in [(1, 3.0), (2, 2.0), (3, 2.5)]:
        ckpts.save_best({"w": np.full(2, step, np.float32)}, "val_loss", value, step, higher_is_better=False)
    state = {"w": jnp.arange(3.0)}
    ckpts.save(3, state)
    ckpts.save(3, {"w": jnp.zeros(3)})  # a step already saved stays as it is
    ckpts.close()
    again = Checkpoints(tmp_path, read_only=True)
    assert again.best == dict(metric="val_loss", value=2.0, step=2) and again.latest_step() == 3
    np.testing.assert_array_equal(again.restore()["w"], np.arange(3.0))
    again.close()
