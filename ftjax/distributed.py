"""Multi-host start-up with JAX's own multi-controller runtime.

``jax.distributed.initialize()`` is called when the environment says this is one of several
processes: explicit coordinator settings (config or ``JAX_COORDINATOR_ADDRESS``), a multi-host TPU
slice, or a SLURM / Open MPI job with more than one task. One process per host, every host runs
the same command.
"""

from __future__ import annotations

import os

import jax
import ml_collections


def _cluster_env() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def initialize(cfg: ml_collections.ConfigDict) -> None:
    """Initialise jax.distributed if this run spans several processes (idempotent)."""
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        if cfg.num_processes <= 0 or cfg.process_id < 0:
            raise ValueError("config.distributed.coordinator_address needs num_processes > 0 and "
                             "process_id >= 0")
        # CPU processes need a collectives backend; GPU/TPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator_address, int(cfg.num_processes),
                                   int(cfg.process_id))
    elif _cluster_env():
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0
