"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402,F401  (imported before the cache variables below, so they skip this process)
import pytest  # noqa: E402

# The many train.py / sweep subprocesses the tests start compile the same few tiny programs: one
# persistent XLA cache for the session lets all but the first skip the compile. It is set after
# jax is imported here, so in-process tests compile as they always do; subprocesses inherit it.
_XLA_CACHE = tempfile.mkdtemp(prefix="ftjax-test-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The prepared-data cache (config.data.cache_dir = "" -> $FTJAX_CACHE/data) lives in the session's
# temporary folder too, never in the user's ~/.cache.
os.environ["FTJAX_CACHE"] = tempfile.mkdtemp(prefix="ftjax-test-cache-")
atexit.register(shutil.rmtree, os.environ["FTJAX_CACHE"], ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
