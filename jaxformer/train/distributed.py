"""Multi-process start: ``jax.distributed.initialize``, explicit or auto-detected.

Call :func:`initialize` before anything touches a device. Recipes (docs/training.md):

* one machine, one process: nothing to do;
* explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` on every process;
* Slurm (``srun``), Open MPI (``mpirun``), Cloud TPU pods / GKE TPU, Kubernetes JobSets:
  ``jax.distributed.initialize()`` reads the cluster's own environment (Kubernetes needs
  ``pip install jax[k8s]``); :func:`detect_cluster` only decides whether there is a cluster to join;
* any other launcher: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
"""

import os
import sys

import jax

from jaxformer.errors import InputError
from jaxformer.train.preemption import any_process


def _int(env, name) -> int:
    try:
        return int(env.get(name, "1"))
    except ValueError:
        return 1


def detect_cluster(env=None) -> str | None:
    """Name of the multi-process environment found in ``env`` (default ``os.environ``), or None.

    ``"env"``: ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read
    here; any launcher can set them). Otherwise the variables of JAX's own cluster detection:
    Slurm (``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1),
    multi-host Cloud TPU (``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_COORDINATOR_ADDRESS``) and
    Kubernetes JobSets (``KUBERNETES_SERVICE_HOST`` with ``JOBSET_NAME``).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
        return "env"
    if env.get("SLURM_JOB_ID") and _int(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("KUBERNETES_SERVICE_HOST") and env.get("JOBSET_NAME"):
        return "k8s"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env=None) -> bool:
    """Joins the multi-process run; returns whether it is one (False: single process, nothing done).

    coordinator: ``host:port`` of process 0's coordination service; with it give num_processes and
    process_id (identical coordinator on every process). Without it a detected cluster is joined.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise InputError("give all of --coordinator HOST:PORT, --num-processes N, --process-id I")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise InputError(f"--process-id {process_id} must lie in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        env = os.environ if env is None else env
        cluster = detect_cluster(env)
        if cluster is None:
            return False
        if cluster == "env":
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                       int(env["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()  # jax reads the cluster's variables
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices", file=sys.stderr)
    return True


def add_arguments(parser) -> None:
    """Adds --coordinator, --num-processes, --process-id to an argparse parser."""
    g = parser.add_argument_group("multi-process (auto-detected on Slurm, MPI, TPU pods, Kubernetes)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (explicit start)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def print0(*args) -> None:
    """``print`` to stderr on process 0 only."""
    if jax.process_index() == 0:
        print(*args, file=sys.stderr, flush=True)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def on_first_process(name: str, fn) -> None:
    """Runs ``fn()`` on process 0 only (e.g. writing shared files), then a barrier. An InputError
    there is raised on every process, which would otherwise wait at the barrier until timeout."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except InputError as e:
            error = e
    if any_process(error is not None):
        raise error or InputError(f"{name}: process 0 stopped on bad input (its log names it)")
    barrier(name)
