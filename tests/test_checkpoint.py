"""Atomic parameter checkpoints: replace, kill -9 mid-write, fall back."""

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxformer.train.checkpoints import restore_pytree, save_pytree


def test_replace_and_restore(tmp_path):
    save_pytree(tmp_path / "ck", {"w": np.zeros((3, 4), np.float32)})
    save_pytree(tmp_path / "ck", {"w": np.ones((3, 4), np.float32)})
    np.testing.assert_array_equal(restore_pytree(tmp_path / "ck")["w"], np.ones((3, 4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.slow
def test_kill_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL a save of a large tree at several moments: the old or the new tree restores, whole."""
    old = np.full((4,), 7.0, np.float32)
    code = textwrap.dedent(f"""
        import numpy as np
        from jaxformer.train.checkpoints import save_pytree
        print("start", flush=True)
        save_pytree({str(tmp_path / 'ck')!r}, {{"w": np.ones((64, 1 << 20), np.float32)}})
    """)
    outcomes = set()
    for delay in (0.0, 0.3, 0.6, 1.0, 1.5):
        save_pytree(tmp_path / "ck", {"w": old})
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        w = np.asarray(restore_pytree(tmp_path / "ck")["w"])
        if w.shape == old.shape:
            np.testing.assert_array_equal(w, old)
            outcomes.add("old")
        else:
            assert w.shape == (64, 1 << 20) and w.min() == w.max() == 1.0
            outcomes.add("new")
    assert "old" in outcomes  # at least one kill landed before the swap


def test_falls_back_to_old_between_renames(tmp_path):
    save_pytree(tmp_path / "ck", {"w": np.arange(3, dtype=np.float32)})
    (tmp_path / "ck").rename(tmp_path / "ck.old")  # the state after the first of the two renames
    np.testing.assert_array_equal(restore_pytree(tmp_path / "ck")["w"], np.arange(3))
