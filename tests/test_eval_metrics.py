"""The jitted eval loop's metrics vs scikit-learn on the same predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn import metrics as skm

from ftjax import sharding
from ftjax.eval.loop import Evaluator
from ftjax.eval.metrics import classification_metrics, lm_metrics


class EchoClassifier(nnx.Module):
    """'Predicts' the class stored in the first input token: logits = one_hot(input_ids[:, 0])."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.bias = nnx.Param(jnp.zeros((num_labels,)))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return jax.nn.one_hot(input_ids[:, 0], self.num_labels) * 10.0 + self.bias[...]


def _imbalanced(seed=0, n=203, c=4):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(c, size=n, p=[0.7, 0.2, 0.08, 0.02])
    noise = rng.random(n) < 0.35
    y_pred = np.where(noise, rng.integers(0, c, n), y_true)
    return y_true, y_pred


def _batches(y_true, y_pred, batch_size):
    n = len(y_true)
    for start in range(0, n, batch_size):
        t, p = y_true[start:start + batch_size], y_pred[start:start + batch_size]
        pad = batch_size - len(t)
        mask = np.r_[np.ones(len(t)), np.zeros(pad)].astype(np.float32)
        t, p = np.r_[t, np.zeros(pad, int)], np.r_[p, np.zeros(pad, int)]
        ids = np.stack([p, np.ones_like(p)], axis=1).astype(np.int32)
        yield dict(input_ids=ids, segment_ids=np.ones_like(ids), positions=np.tile(np.arange(2), (batch_size, 1)).astype(np.int32),
                   labels=t.astype(np.int32), example_mask=mask)


@pytest.mark.parametrize("mesh_sizes", [dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1)])
def test_eval_loop_matches_sklearn(mesh_sizes):
    y_true, y_pred = _imbalanced()
    devices = jax.devices()[: np.prod(list(mesh_sizes.values()))]
    mesh = sharding.make_mesh(mesh_sizes, devices)
    graphdef, params, rest = nnx.split(EchoClassifier(4), nnx.Param, ...)
    ev = Evaluator(graphdef, mesh, kind="classification", num_labels=4)
    m = ev.run(params, rest, _batches(y_true, y_pred, 16))
    assert m["num_examples"] == len(y_true)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(p)
        assert m[f"recall_{avg}"] == pytest.approx(r)
        assert m[f"f1_{avg}"] == pytest.approx(f)
    np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(y_true, y_pred))
    per_f1 = skm.f1_score(y_true, y_pred, average=None, zero_division=0)
    np.testing.assert_allclose([row["f1"] for row in m["per_class"]], per_f1)


def test_macro_and_micro_differ_on_imbalance():
    # 9 of class 0 all right, 1 of class 1 predicted as 0: micro F1 = accuracy = 0.9, macro F1
    # = (F1_0 + F1_1) / 2 = (2*0.9*1/(1.9) + 0) / 2 by hand.
    cm = np.array([[9, 0], [1, 0]])
    m = classification_metrics(cm)
    assert m["f1_micro"] == pytest.approx(0.9)
    assert m["f1_macro"] == pytest.approx((2 * 0.9 / 1.9) / 2)
    assert m["per_class"][1]["precision"] == 0.0


def test_lm_metrics_by_hand():
    m = lm_metrics(nll_sum=20.0, tokens=10, num_bytes=40)
    assert m["loss"] == pytest.approx(2.0)
    assert m["perplexity"] == pytest.approx(np.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(20.0 / 40 / np.log(2))
