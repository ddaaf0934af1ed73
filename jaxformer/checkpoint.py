"""Orbax checkpoints shared by both models: parameter trees saved atomically, and a training
run's train states and best parameters (:class:`Checkpoints`).

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


class Checkpoints:
    """A training run's checkpoints, shared by both trainers::

        DIR/checkpoints/<step>/   whole train states (params, optimizer state, step, PRNG key), the
                                  last ``keep``, for --resume
        DIR/best/  DIR/best.json  the params that scored best on an evaluation metric (optional)

    Train states go through Orbax's ``CheckpointManager``: each is written into a temporary
    directory and renamed when complete, and older ones are deleted only after a newer one is
    committed, so a SIGKILL mid-write leaves the previous checkpoint intact (the torn temporary
    directory is removed by the next run). ``best/`` is replaced by :func:`save_pytree`, the JSON by
    rename. All processes call every method together.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory).absolute()
        self.states = self.dir / "checkpoints"
        # Torn writes are removed here, synchronously and tolerant of a concurrent removal; Orbax's
        # own cleanup runs in a background thread that can race another manager.
        if jax.process_index() == 0 and self.states.is_dir():
            for tmp in self.states.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=False,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.states, options=options)
        self.best_path = self.dir / "best.json"

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Writes ``state`` (a pytree of jax Arrays, possibly sharded across processes) as ``step``."""
        self.manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, like=None, step: int | None = None):
        """The state at ``step`` (default: latest) shaped and placed like ``like``: a tree of
        ``jax.ShapeDtypeStruct`` with shardings (any mesh: Orbax reshards on read). Without
        ``like``, the tree as saved (a NamedTuple comes back as a dict)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.states}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(like))

    @property
    def best(self) -> dict | None:
        """``{"metric", "value", "step"}`` of the saved best params, or None."""
        return json.loads(self.best_path.read_text()) if self.best_path.is_file() else None

    def save_best(self, params, metric: str, value: float, step: int, higher_is_better: bool = True) -> bool:
        """Saves ``params`` to ``best/`` if ``value`` beats the best so far; returns whether it did."""
        best = self.best
        sign = 1.0 if higher_is_better else -1.0
        if best is not None and not sign * value > sign * best["value"]:
            return False
        save_pytree(self.dir / "best", params)
        if jax.process_index() == 0:
            tmp = self.best_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(metric=metric, value=float(value), step=int(step))) + "\n")
            os.replace(tmp, self.best_path)
        return True

    def close(self) -> None:
        self.manager.close()
