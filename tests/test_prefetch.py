"""The background batch prefetcher: same stream, the consumed batch's state, errors, stopping."""

import threading
import time

import numpy as np
import pytest

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import pipeline
from ftjax.data.prefetch import Prefetcher
from ftjax.data.records import DataError

DOCS = [f"document number {i} says {' '.join(['word'] * (i % 7))} done" for i in range(60)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("prefetch") / "docs.txt", "\n".join(DOCS) + "\n")
    cfg = data_cfg(task="lm", train_path=path, seq_len=32, clean__leakage="off", cache_dir="none")
    return pipeline.build(cfg, bert_tokenizer(), seed=3)


def _prefetcher(it, depth):
    return Prefetcher(lambda: next(it), it.get_state, lambda b: b, depth)


def test_state_is_the_consumed_batch_and_resumes_exactly(pipe):
    ref = pipe.train_iterator(4)  # the plain iterator, stepped in this thread: the reference
    ref_batches, ref_states = [], [ref.get_state()]
    for _ in range(5):
        ref_batches.append(next(ref))
        ref_states.append(ref.get_state())
    it = pipe.train_iterator(4)
    with _prefetcher(it, depth=3) as batches:
        assert batches.get_state() == ref_states[0]
        for k in range(3):
            got = next(batches)
            for key in ref_batches[k]:
                np.testing.assert_array_equal(got[key], ref_batches[k][key], err_msg=key)
            assert batches.get_state() == ref_states[k + 1]
        deadline = time.time() + 10
        while it.get_state()["step"] < 7 and time.time() < deadline:
            time.sleep(0.01)
        assert it.get_state()["step"] == 7  # ran ahead: 3 queued, a 4th built and waiting
        saved = batches.get_state()
    resumed = pipe.train_iterator(4)  # a checkpoint's state restored into a fresh iterator
    resumed.set_state(saved)
    for k in (3, 4):
        got = next(resumed)
        for key in ref_batches[k]:
            np.testing.assert_array_equal(got[key], ref_batches[k][key], err_msg=key)


def test_off_builds_in_the_caller(pipe):
    it = pipe.train_iterator(4)
    batches = _prefetcher(it, depth=0)
    next(batches)
    assert it.get_state()["step"] == 1 and batches.get_state()["step"] == 1
    assert not any(t.name == "ftjax-prefetch" for t in threading.enumerate())


def test_build_error_is_raised_in_the_loop_and_the_thread_stops():
    made = iter(range(10))

    def produce():
        i = next(made)
        if i == 2:
            raise DataError("docs.txt line 3: not valid UTF-8")
        return i

    batches = Prefetcher(produce, lambda: None, lambda b: b * 10, depth=2)
    assert [next(batches), next(batches)] == [0, 10]
    with pytest.raises(DataError, match=r"^docs.txt line 3: not valid UTF-8$"):
        next(batches)
    assert batches._thread is None and not any(t.name == "ftjax-prefetch" for t in threading.enumerate())


def test_close_stops_a_thread_blocked_on_a_full_queue():
    batches = Prefetcher(lambda: np.zeros(3), lambda: None, lambda b: b, depth=2)
    next(batches)
    time.sleep(0.3)  # the queue fills and the producer blocks on it
    thread = batches._thread
    start = time.time()
    batches.close()
    assert not thread.is_alive() and time.time() - start < 2
