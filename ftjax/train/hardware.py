"""Target machines for planning a run: devices, peak matmul FLOP/s and memory per device, and the
model-FLOPs utilisation (MFU) assumed for them.

Sources (dense figures, no structured sparsity):
- TPU v5e: 197 bf16 TFLOP/s and 16 GB HBM2 per chip, 8 chips per host (Cloud TPU docs, "TPU
  v5e", https://cloud.google.com/tpu/docs/v5e). float32 matmuls at jax's default precision run
  as one bf16 pass on the MXU, so at the same rate.
- H100 SXM: 989.4 dense bf16 TFLOP/s (NVIDIA's datasheet prints 1,979 "with sparsity"), TF32
  494.7, 80 GB HBM3; 8 per HGX/DGX node. float32 matmuls run as TF32 at jax's default precision.
  jax preallocates 75% of a GPU's memory by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``); the
  table counts all 80 GB.
- cpu: this machine, measured: a jitted float32 (or the config's dtype) 1024^3 matmul for ~1 s,
  best of the repeats; memory is what this process could use (``memory.device_limit``).

Default MFU: 0.4 on the accelerators, somewhat below what large, well-sharded training reaches
(PaLM 540B: 46.2% on TPU v4, Chowdhery et al. 2022); a small model (the demo's 22M-parameter
MiniLM on 8 chips) runs far below it, so there the time is a floor. 0.5 on the CPU: its peak is
already an achieved matmul rate, and a training step adds work the FLOP count leaves out
(softmax, norms, GELU, the optimizer update) and smaller matmul shapes. Chosen before measuring;
benchmarks/check_plan.py then found step times within 30% for full, LoRA, head-only and BitFit
(docs/workflows.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError
from ftjax.train import flops, memory

GB = 10 ** 9


class HardwareError(FtjaxError, ValueError):
    """A hardware name the planner does not know."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    peak_flops: dict[str, float]  # per device, by compute dtype
    memory_bytes: int | None  # per device; None: unknown
    mfu: float  # default utilisation of the peak

    def peak(self, dtype: str) -> float:
        return self.peak_flops[dtype if dtype in self.peak_flops else "bfloat16"]


TARGETS = {
    "v5e-8": Hardware("v5e-8", 8, {"bfloat16": flops.PEAK_FLOPS["TPU v5e"],
                                   "float32": flops.PEAK_FLOPS["TPU v5e"]}, 16 * memory.GIB, 0.4),
    "h100x8": Hardware("h100x8", 8, {"bfloat16": flops.PEAK_FLOPS["NVIDIA H100"],
                                     "float32": flops.PEAK_FLOPS["NVIDIA H100"] / 2}, 80 * GB, 0.4),
}
NAMES = (*TARGETS, "cpu")
CPU_MFU = 0.5


@functools.cache
def cpu_matmul_flops(dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's matmul throughput (FLOP/s, all cores): best of repeated jitted n^3 matmuls."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()  # compile
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def get(name: str, dtype: str = "float32") -> Hardware:
    """The named target; ``cpu`` measures this machine (its jax devices share the cores)."""
    if name == "cpu":
        devices = len(jax.local_devices())
        return Hardware("cpu", devices, {dtype: cpu_matmul_flops(dtype) / devices},
                        memory.device_limit(), CPU_MFU)
    if name not in TARGETS:
        raise HardwareError(f"--hardware={name!r} is not a known target; choose from {', '.join(NAMES)}")
    return TARGETS[name]
