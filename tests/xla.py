"""XLA flags for the suite's processes (conftest's own, and those of the subprocesses tests start).

LLVM at optimisation level 0: the suite's tiny programs compile in about half the time (a tiny
train step: 43 -> 21 s on the loaded 2-core box) and compute the same floats (XLA's CPU backend
uses no fast-math at either level); they run a little slower, which tiny models do not notice.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a process with ``devices`` fake CPU devices (None: the real one)."""
    if devices is None:
        return FAST_COMPILE
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
