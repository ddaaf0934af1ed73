"""Orbax checkpoints shared by both models: parameter trees saved atomically and restored.

A tree is written into ``DIR.new`` (Orbax itself writes into a temporary directory and renames it
when complete) and only then swapped with ``DIR``, so a process killed at any moment leaves a
complete checkpoint behind: the old one, the new one, or (killed between the two renames) the old
one as ``DIR.old``, which :func:`restore_pytree` falls back to.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def save_pytree(path: str | Path, tree) -> None:
    """Writes ``tree`` (arrays) to the directory ``path``, replacing an existing one atomically."""
    path = Path(path).absolute()
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, tree, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_pytree {path}")


def restore_pytree(path: str | Path, like=None):
    """Reads a tree written by :func:`save_pytree`.

    like: optional tree of arrays or ``jax.ShapeDtypeStruct`` (with shardings) giving the target
    structure, dtypes and placement; without it, arrays come back as saved.
    """
    path = Path(path).absolute()
    if not path.is_dir() and path.with_name(path.name + ".old").is_dir():
        path = path.with_name(path.name + ".old")  # killed between the two renames of a save
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path)
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), like)
        return ckptr.restore(path, abstract)


class TrainCheckpoints:
    """A training run's checkpoints in one directory, reusable by any trainer::

        latest/           the whole train state (params, optimizer state, step, PRNG key), for --resume
        best/             the params with the best evaluation metric so far
        checkpoints.json  {"latest_step", "best_step", "best": metric value, "metric": name}

    Each directory is replaced atomically (see :func:`save_pytree`) and the JSON file by rename.
    """

    def __init__(self, directory: str | Path, metric: str = "bleu", higher_is_better: bool = True):
        self.dir = Path(directory).absolute()
        self.meta_path = self.dir / "checkpoints.json"
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else \
            dict(latest_step=None, best_step=None, best=None, metric=metric)
        self.sign = 1.0 if higher_is_better else -1.0

    def _write_meta(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta) + "\n")
        os.replace(tmp, self.meta_path)

    @property
    def has_latest(self) -> bool:
        return self.meta["latest_step"] is not None and (self.dir / "latest").is_dir()

    def save_latest(self, state, step: int) -> None:
        save_pytree(self.dir / "latest", state)
        self.meta["latest_step"] = int(step)
        self._write_meta()

    def restore_latest(self, like):
        """The latest train state, with the structure of ``like`` (e.g. a freshly created state)."""
        return restore_pytree(self.dir / "latest", like)

    def is_better(self, value: float) -> bool:
        return self.meta["best"] is None or self.sign * value > self.sign * self.meta["best"]

    def save_best(self, params, value: float, step: int) -> bool:
        """Saves ``params`` as best if ``value`` beats the best so far; returns whether it did."""
        if not self.is_better(value):
            return False
        save_pytree(self.dir / "best", params)
        self.meta.update(best=float(value), best_step=int(step))
        self._write_meta()
        return True
