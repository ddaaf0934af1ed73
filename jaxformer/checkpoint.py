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
    structure, dtypes and placement; without it, the arrays come back on one device (whatever mesh
    saved them) in the saved structure.
    """
    path = Path(path).absolute()
    if not path.is_dir() and path.with_name(path.name + ".old").is_dir():
        path = path.with_name(path.name + ".old")  # killed between the two renames of a save
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path, _on_one_device(path))
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), like)
        return ckptr.restore(path, abstract)


def _on_one_device(path: Path):
    """The tree saved at ``path`` (a StandardCheckpointer directory) as ``jax.ShapeDtypeStruct`` on
    this process's first device: a restore target that works whatever mesh wrote the arrays."""
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


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

    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False):
        self.dir = Path(directory).absolute()
        self.states = self.dir / "checkpoints"
        # Torn writes are removed here, synchronously and tolerant of a concurrent removal; Orbax's
        # own cleanup runs in a background thread that can race another manager. A reader
        # (read_only: loading a model while its run may still be writing) touches nothing.
        if not read_only and jax.process_index() == 0 and self.states.is_dir():
            for tmp in self.states.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=False, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.states, options=options)
        best_path = self.dir / "best.json"
        # Read once: every process then takes the same save_best decisions (a collective write).
        self._best = json.loads(best_path.read_text()) if best_path.is_file() else None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Writes ``state`` (a pytree of jax Arrays, possibly sharded across processes) as ``step``;
        a step already saved is kept as it is (a step's state is a function of the step)."""
        if int(step) in self.manager.all_steps():
            return
        self.manager.save(int(step), args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, like=None, step: int | None = None):
        """The state at ``step`` (default: latest) shaped and placed like ``like``: a tree of
        ``jax.ShapeDtypeStruct`` with shardings (any mesh: Orbax reshards on read). Without
        ``like``, the tree as saved (a NamedTuple comes back as a dict), on one device."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.states}")
        if like is None:
            like = _on_one_device(self.states / str(step) / "default")
        return self.manager.restore(step, args=ocp.args.StandardRestore(like))

    @property
    def best(self) -> dict | None:
        """``{"metric", "value", "step"}`` of the saved best params, or None."""
        return self._best

    def save_best(self, params, metric: str, value: float, step: int, higher_is_better: bool = True) -> bool:
        """Saves ``params`` to ``best/`` if ``value`` beats the best so far; returns whether it did."""
        sign = 1.0 if higher_is_better else -1.0
        if self._best is not None and not sign * value > sign * self._best["value"]:
            return False
        save_pytree(self.dir / "best", params)
        self._best = dict(metric=metric, value=float(value), step=int(step))
        if jax.process_index() == 0:
            path = self.dir / "best.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._best) + "\n")
            os.replace(tmp, path)
        return True

    def close(self) -> None:
        self.manager.close()
