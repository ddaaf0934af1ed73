"""Device meshes and sharding rules shared by the trainers (JAX SPMD: ``NamedSharding`` + ``jax.jit``).

A mesh has two axes, ``data`` and ``fsdp`` (``--mesh data=4,fsdp=2``; a missing axis has size 1):

* the batch is split over both axes (FSDP is data parallelism whose parameters are also split);
* parameters and optimizer state are split over ``fsdp`` on their largest divisible dimension and
  replicated when none divides (or the array is small);
* each process loads only its rows of the global batch and hands them to
  ``jax.make_array_from_process_local_data``.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxformer.errors import InputError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over every mesh axis


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}``; an empty spec means ``data=-1`` (all
    devices). One axis may be ``-1``: it takes the devices the others leave."""
    sizes = dict.fromkeys(AXES, 1)
    if not spec:
        return {**sizes, "data": -1}
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in AXES:
            raise InputError(f"--mesh {spec!r}: expected items like data=4,fsdp=2 with axes {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InputError(f"--mesh {spec!r}: size of {name!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise InputError(f"--mesh {spec!r}: size of {name!r} must be positive or -1")
    if list(sizes.values()).count(-1) > 1:
        raise InputError(f"--mesh {spec!r}: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """Mesh over ``devices`` (default: all, across processes) with axes ``("data", "fsdp")``.

    A mesh smaller than the device list uses its first devices (handy for comparing a 1-device run
    with an 8-device one in the same process); in a multi-process run it must cover all of them.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if len(devices) % known:
                raise InputError(f"--mesh {spec!r}: {len(devices)} devices are not divisible by {known}")
            sizes[name] = len(devices) // known
    n = math.prod(sizes.values())
    if n > len(devices):
        raise InputError(f"--mesh {spec!r} needs {n} devices; there are {len(devices)}")
    if n < len(devices) and jax.process_count() > 1:
        raise InputError(f"--mesh {spec!r} covers {n} of {len(devices)} devices; a multi-process mesh must cover all")
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices[:n])


def batch_size_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the number of batch shards)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Splits dimension ``batch_dim`` of batch arrays (of any rank above it) over all mesh axes."""
    return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 1024) -> P:
    """PartitionSpec splitting the largest dimension of ``shape`` divisible by ``fsdp`` over the
    ``fsdp`` axis (the last such dimension on ties); ``P()`` (replicated) when none divides, when
    ``fsdp == 1`` or when the array has fewer than ``min_size`` elements."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def state_shardings(mesh: Mesh, tree, min_size: int = 1024):
    """NamedShardings for a tree of arrays or ``jax.ShapeDtypeStruct`` (params, optimizer state,
    a whole train state) by :func:`fsdp_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def with_shardings(tree, shardings):
    """``jax.ShapeDtypeStruct`` tree carrying ``shardings`` (the target of a restore or a jit)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def put_global(tree, shardings):
    """Places a tree of host arrays, identical in every process, on the mesh (works multi-process)."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> slice:
    """The rows of the global batch that this process must load: the span of ``batch_dim`` its
    devices hold (contiguous for meshes from :func:`make_mesh`)."""
    spans = {(s[batch_dim].start or 0, global_shape[batch_dim] if s[batch_dim].stop is None else s[batch_dim].stop)
             for s in sharding.addressable_devices_indices_map(global_shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise InputError(f"this process's batch rows are not contiguous: {sorted(spans)}")
    return slice(lo, hi)


def put_batch(global_batch: np.ndarray, sharding: NamedSharding, batch_dim: int = 0) -> jax.Array:
    """A global batch on the mesh from this process's rows of it.

    global_batch: the whole batch, identical in every process (cheap for token windows), e.g.
    int32[accum, batch, length + 1]; only this process's rows are transferred.
    """
    shape = list(global_batch.shape)
    rows = local_rows(sharding, tuple(shape), batch_dim)
    index = [slice(None)] * len(shape)
    index[batch_dim] = rows
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(global_batch[tuple(index)]),
                                                  tuple(shape))


def gathered(tree):
    """The tree with every array whole on this process: the tree itself in one process (its arrays,
    sharded or not, are all addressable here; nothing is copied), gathered across processes into
    host arrays otherwise (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
