"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

import xla

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla.flags(8)).strip()
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
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ftjax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The prepared-data cache (config.data.cache_dir = "" -> $FTJAX_CACHE/data) lives in the session's
# temporary folder too, never in the user's ~/.cache.
# (pytest-xdist workers inherit the controller's folders, as they do the XLA cache's.)
if "FTJAX_TEST_CACHE" not in os.environ:
    os.environ["FTJAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="ftjax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FTJAX_TEST_CACHE"], ignore_errors=True)
os.environ["FTJAX_CACHE"] = os.environ["FTJAX_TEST_CACHE"]

# `make test` runs two pytest-xdist workers: one OpenMP thread each for torch (the PyTorch reference
# side), so a worker's idle OpenMP team does not spin on the cores the other worker computes on.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The longest files go first (make test passes --no-loadscope-reorder, so xdist keeps this order
# and hands the next file to whichever worker is free), so none is left running alone at the end.
_LONGEST_FIRST = ("test_fused.py", "test_sweep_ray.py", "test_preference_sentiment.py", "test_meta.py",
                  "test_preference_train.py", "test_train_loop.py",
                  "test_peft_methods.py", "test_preference_step.py", "test_peft_zoo.py",
                  "test_serve_continuous.py", "test_gguf_tokenizer.py",
                  "test_faults_resume.py", "test_search.py", "test_export.py", "test_object_store.py",
                  "test_wheel.py", "test_generate.py", "test_multiprocess.py", "test_gguf.py",
                  "test_sweep_faults.py", "test_workflows.py", "test_resume_logs.py", "test_serve.py",
                  "test_faults_checkpoint.py", "test_incontext.py", "test_incontext_prefix.py",
                  "test_plan.py", "test_privacy.py", "test_scaling.py", "test_faults_export.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
