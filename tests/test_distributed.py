"""Cluster detection and explicit-start validation (the 2-process run is in test_gpt2_train.py)."""

import pytest

from jaxformer.train import distributed


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),  # a one-task Slurm job: nothing to join
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU VM
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOBSET_NAME": "train"}, "k8s"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, None),  # jax would still need the process count and id
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "env"),
])
def test_detect_cluster(env, want):
    assert distributed.detect_cluster(env) == want


def test_single_process_is_a_no_op():
    assert distributed.initialize(env={}) is False


@pytest.mark.parametrize("args, match", [
    (("localhost:1234", 2, None), "give all of"),
    (("localhost", 2, 0), "HOST:PORT"),
    (("localhost:1234", 2, 2), r"\[0, 2\)"),
])
def test_explicit_start_is_validated(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args)
