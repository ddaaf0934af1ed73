"""What makes a training run survive being killed: step-numbered atomic checkpoints and a
SIGTERM/SIGINT guard that lets the current step finish.

Checkpoints go to ``DIR/<step>/`` through Orbax's ``CheckpointManager``: each is written into a
temporary directory and renamed into place when complete, and older ones are deleted only after a
newer one is committed. A SIGKILL in the middle of a write therefore leaves the previous checkpoint
intact (the half-written temporary directory is ignored and cleaned up by the next run).
"""

import shutil
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class StepCheckpoints:
    """Train states saved by step in ``directory``; all processes call every method together."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory).absolute()
        # Torn writes (a killed save) are removed here, synchronously and tolerant of a concurrent
        # removal; Orbax's own cleanup runs in a background thread that can race another manager.
        if jax.process_index() == 0 and self.dir.is_dir():
            for tmp in self.dir.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=False,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Writes ``state`` (a pytree of jax Arrays, possibly sharded across processes) as ``step``."""
        self.manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """The state at ``step`` (default: latest) shaped and placed like ``like``: a tree of
        ``jax.ShapeDtypeStruct`` with shardings (any mesh: Orbax reshards on read)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(like))

    def close(self) -> None:
        self.manager.close()


class StopRequested:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls between steps.

    ``bool(guard)`` is True once a signal arrived (``guard.signal`` names it); a second SIGINT
    while stopping raises KeyboardInterrupt as usual. Previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def __bool__(self) -> bool:
        return self.signal is not None


def any_process(flag: bool) -> bool:
    """True if ``flag`` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(jax.numpy.int32(flag)).max())
