"""Mesh specs and sharding rules (the 8-device and 2-process runs are in test_gpt2_train.py)."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from jaxformer.train import sharding as sh


def test_parse_mesh():
    assert sh.parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    assert sh.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
    assert sh.parse_mesh(None) == {"data": -1, "fsdp": 1}
    for bad in ("data=4,model=2", "data", "data=x", "data=0", "data=-1,fsdp=-1"):
        with pytest.raises(ValueError, match="--mesh"):
            sh.parse_mesh(bad)


def test_make_mesh_errors_and_defaults():
    mesh = sh.make_mesh(None)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sh.make_mesh("data=16")


@given(shape=st.lists(st.integers(1, 64), min_size=0, max_size=4), fsdp=st.sampled_from([1, 2, 4, 8]))
def test_fsdp_spec_splits_the_largest_divisible_dim(shape, fsdp):
    spec = sh.fsdp_spec(tuple(shape), fsdp, min_size=1)
    divisible = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if fsdp == 1 or not divisible:
        assert spec == P()
    else:
        (axis,) = [i for i, a in enumerate(spec) if a == "fsdp"]
        assert shape[axis] % fsdp == 0 and shape[axis] == max(shape[i] for i in divisible)
        assert len(spec) == len(shape)


def test_small_arrays_stay_replicated():
    assert sh.fsdp_spec((2,), 2) == P()  # e.g. a PRNG key
    assert sh.fsdp_spec((4, 1024), 2) == P(None, "fsdp")


def test_put_batch_and_local_rows_on_one_device():
    mesh = sh.make_mesh("data=1", jax.devices()[:1])
    s = sh.batch_sharding(mesh, batch_dim=1)
    batch = np.arange(2 * 4 * 5, dtype=np.int32).reshape(2, 4, 5)
    assert sh.local_rows(s, batch.shape, 1) == slice(0, 4)
    x = sh.put_batch(batch, s, batch_dim=1)
    assert x.sharding == s
    np.testing.assert_array_equal(np.asarray(x), batch)
    tree = {"w": np.ones((8, 4), np.float32)}
    placed = sh.put_global(tree, sh.state_shardings(mesh, tree))
    np.testing.assert_array_equal(np.asarray(placed["w"]), tree["w"])
