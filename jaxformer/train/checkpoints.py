"""Orbax checkpoints shared by both models: parameter trees saved atomically, a training run's
train states and best parameters (:class:`Checkpoints`), and a seal that tells damage apart.

A tree is written into ``DIR.new`` (Orbax itself writes into a temporary directory and renames it
when complete) and only then swapped with ``DIR``, so a process killed at any moment leaves a
complete checkpoint behind: the old one, the new one, or (killed between the two renames) the old
one as ``DIR.old``, which :func:`restore_pytree` falls back to.

Every complete checkpoint is sealed: ``jaxformer-checksums.json`` lists each file's size and
CRC-32. Before a restore the files are checked against it, so a truncated, partly deleted or
overwritten checkpoint is refused (or skipped, for ``--resume``) with a message naming the file,
instead of an Orbax traceback or training on garbage. An unsealed checkpoint (killed between its
commit and its seal) is restored unchecked.
"""

import contextlib
import json
import os
import shutil
import sys
import threading
import warnings
import zlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxformer.errors import CheckpointError

SEAL = "jaxformer-checksums.json"


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose arrays do not fit the config (not damage: nothing is skipped)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match their seal, or an unsealed one that cannot be read."""


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --- seals -----------------------------------------------------------------------------------------

def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SEAL)


def seal(directory: str | Path) -> None:
    """Writes ``directory/jaxformer-checksums.json`` (size and CRC-32 of every file), atomically."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): [p.stat().st_size, _crc32(p)] for p in _files(directory)}
    tmp = directory / (SEAL + ".tmp")
    tmp.write_text(json.dumps(files, indent=0) + "\n")
    os.replace(tmp, directory / SEAL)


def verify(directory: str | Path) -> bool:
    """Checks the files of a checkpoint against its seal; returns False when it has none.
    Raises :class:`CheckpointDamaged` naming the first missing, truncated or altered file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / SEAL).is_file():
        return False
    try:
        files = json.loads((directory / SEAL).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"{directory / SEAL}: unreadable ({e})") from None
    for rel, (size, crc) in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointDamaged(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointDamaged(f"{path} has {path.stat().st_size} bytes, {size} were written")
        if _crc32(path) != crc:
            raise CheckpointDamaged(f"{path} does not match its checksum (altered after it was written)")
    return True


@contextlib.contextmanager
def _quiet_failures():
    """Orbax's aborted reads leave coroutines and threads that print tracebacks; a failed restore is
    reported once, as a CheckpointError, so those are silenced while it runs."""
    hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = threading.excepthook = lambda *a: None
    try:
        yield
    finally:
        sys.unraisablehook, threading.excepthook = hooks


def _restore(restore_fn, path: Path, sealed: bool):
    """Runs ``restore_fn()``; any failure becomes a CheckpointError naming ``path``: damage
    (:class:`CheckpointDamaged`) when it is unsealed, else not (its files are as written: memory,
    devices...). A CheckpointMismatch (the config's fault) passes as it is."""
    try:
        with _quiet_failures():
            return restore_fn()
    except CheckpointError:
        raise
    except Exception as e:  # Orbax/TensorStore raise bare Exception, ValueError, AttributeError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if sealed:
            raise CheckpointError(f"{path}: its files match their checksums but restoring failed ({first[:300]})"
                                  ) from None
        raise CheckpointDamaged(f"{path}: unreadable checkpoint ({first[:300]})") from None


def _flat(tree) -> dict[str, object]:
    """Leaves by path ``a/b/0``, whatever the containers (a NamedTuple is saved as a dict)."""
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {"/".join(map(name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(path: Path, tree_metadata, like) -> None:
    """CheckpointMismatch naming the first key whose stored shape differs from ``like``'s (the config's)."""
    saved, want = _flat(tree_metadata), _flat(like)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise CheckpointMismatch(f"{path} does not fit the config: missing {missing[:4]}, unexpected {extra[:4]}")
    for key, leaf in want.items():
        got = tuple(saved[key].shape)
        if got != tuple(np.shape(leaf)):
            raise CheckpointMismatch(f"{path}: {key} has shape {got} in the checkpoint, {tuple(np.shape(leaf))} "
                                     "expected from the config")


# --- parameter trees -------------------------------------------------------------------------------

def save_pytree(path: str | Path, tree) -> None:
    """Writes ``tree`` (arrays) to the directory ``path``, sealed, replacing an existing one atomically."""
    path = Path(path).absolute()
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, tree, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        seal(new)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    _sync(f"save_pytree {path}")


def restore_pytree(path: str | Path, like=None):
    """Reads a tree written by :func:`save_pytree`, after checking it against its seal.

    like: optional tree of arrays or ``jax.ShapeDtypeStruct`` giving the target structure, shapes,
    dtypes and placement (a mismatch is a CheckpointMismatch naming the key; without a sharding,
    one device); without it, the arrays come back on one device as saved. Either way any mesh
    may have saved them.
    """
    path = Path(path).absolute()
    if not path.is_dir() and path.with_name(path.name + ".old").is_dir():
        path = path.with_name(path.name + ".old")  # killed between the two renames of a save
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    sealed = verify(path)
    with ocp.StandardCheckpointer() as ckptr:
        def restore():
            metadata = _saved_tree(path)
            if like is None:
                return ckptr.restore(path, _on_one_device(metadata))
            _check_shapes(path, metadata, like)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # when like names none
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) or device),
                like)
            return ckptr.restore(path, abstract)
        return _restore(restore, path, sealed)


def _saved_tree(path: Path):
    """The array metadata tree of a StandardCheckpointer directory."""
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path)
    if metadata is None or metadata.item_metadata is None:
        raise CheckpointError(f"{path}: no checkpoint metadata")
    return metadata.item_metadata.tree


def _on_one_device(tree_metadata):
    """Saved-array metadata as ``jax.ShapeDtypeStruct`` on this process's first device: a restore
    target that works whatever mesh wrote the arrays."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree_metadata)


# --- a training run --------------------------------------------------------------------------------

class Checkpoints:
    """A training run's checkpoints, shared by both trainers::

        DIR/checkpoints/<step>/   whole train states (params, optimizer state, step, PRNG key), the
                                  last ``keep``, for --resume
        DIR/best/  DIR/best.json  the params that scored best on an evaluation metric (optional)
        DIR/damaged/<step>/       checkpoints found damaged on resume, moved aside (never deleted)

    Train states go through Orbax's ``CheckpointManager``: each is written into a temporary
    directory and renamed when complete, and older ones are deleted only after a newer one is
    committed, so a SIGKILL mid-write leaves the previous checkpoint intact (the torn temporary
    directory is removed by the next run). ``best/`` is replaced by :func:`save_pytree`, the JSON by
    rename. All processes call every method together.
    """

    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False):
        self.dir = Path(directory).absolute()
        self.states = self.dir / "checkpoints"
        self.read_only = read_only
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
        """Writes ``state`` (a pytree of jax Arrays, possibly sharded across processes) as ``step``,
        sealed; a step already saved is kept as it is (a step's state is a function of the step)."""
        if int(step) in self.manager.all_steps():
            if jax.process_index() == 0 and not (self.states / str(int(step)) / SEAL).is_file():
                seal(self.states / str(int(step)))  # written by a process killed before it sealed
            _sync(f"checkpoint {step}")
            return
        self.manager.save(int(step), args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            seal(self.states / str(int(step)))
        _sync(f"checkpoint {step}")

    def restore(self, like=None, step: int | None = None):
        """The state at ``step`` (default: latest), checked against its seal, shaped and placed like
        ``like``: a tree of ``jax.ShapeDtypeStruct`` with shardings (any mesh: Orbax reshards on read).
        Without ``like``, the tree as saved (a NamedTuple comes back as a dict), on one device."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.states}")
        path = self.states / str(step)
        sealed = verify(path)

        def restore():
            saved = _saved_tree(path / "default")
            target = _on_one_device(saved) if like is None else like
            _check_shapes(path, saved, target)
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return _restore(restore, path, sealed)

    def restore_latest(self, like=None):
        """(state, step) from the newest intact checkpoint, or (None, None) when there is none.

        A damaged newer one is skipped with a warning naming it and moved to ``damaged/`` (so that
        the run writes that step afresh); when every checkpoint is damaged, or only set-aside ones
        are left, a CheckpointError (a resume never silently starts again)."""
        problems = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(like, step)
            except CheckpointDamaged as e:
                problems.append(f"step {step}: {e}")
                where = "" if self.read_only else f"; moved to {self.dir / 'damaged' / str(step)}"
                warnings.warn(f"checkpoint step {step} is damaged and skipped ({e}){where}")
                self._set_aside(step)
                continue
            return state, step
        if problems:
            raise CheckpointError(f"no intact checkpoint in {self.states}: " + "; ".join(problems))
        damaged = self.dir / "damaged"
        if damaged.is_dir() and any(damaged.iterdir()):
            raise CheckpointError(f"no intact checkpoint in {self.states}; damaged ones were set aside in {damaged} "
                                  f"(start a new run with a new --out, or move a step back to resume from it)")
        return None, None

    def _set_aside(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            damaged = self.dir / "damaged"
            damaged.mkdir(exist_ok=True)
            target = damaged / str(step)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(self.states / str(step), target)
        _sync(f"set aside {step}")
        self.manager.reload()

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


def load_run_params(directory: str | Path, like=None):
    """The params a training run directory offers: ``best/`` if intact, else those of the newest
    intact checkpoint (a damaged candidate is skipped with a warning naming it). ``like``: as in
    :func:`restore_pytree` (the params' expected shapes)."""
    d = Path(directory)
    if (d / "best").is_dir():
        try:
            return restore_pytree(d / "best", like)
        except CheckpointDamaged as e:
            if not (d / "checkpoints").is_dir():
                raise
            warnings.warn(f"{d / 'best'} is damaged ({e}); using the newest intact checkpoint instead")
    if not (d / "checkpoints").is_dir():
        raise CheckpointError(f"{d}: neither best/ nor checkpoints/ holds parameters")
    ckpts = Checkpoints(d, read_only=True)
    try:
        state, step = ckpts.restore_latest()
    finally:
        ckpts.close()
    if state is None:
        raise CheckpointError(f"{d / 'checkpoints'}: no checkpoint")
    params = state["params"]
    if like is None:
        return params
    _check_shapes(d / "checkpoints" / str(step), params, like)
    return jax.tree.map(lambda x, want: x.astype(want.dtype), params, like)
