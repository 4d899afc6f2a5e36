"""Meta-learning for few-shot (ftjax.experiments.meta / episodes): first-order MAML and Reptile
against a hand-written NumPy implementation, the episode sampler on the shared data sets, and the
few-shot study end to end on a tiny Llama in-process."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ftjax.config import base_config
from ftjax.data import encode, packing, presets
from ftjax.data.records import DataError
from ftjax.experiments import episodes, fewshot, meta
from ftjax.experiments.sweep import Arm
from ftjax.models.assets import minilm_path
from ftjax.train.step import TrainState

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
V, F, D, CMAX = 11, 5, 4, 3  # vocabulary, token features, hidden, most labels


# ----------------------------------------------------------------------------- a tiny model

class _Body(nnx.Module):
    def __init__(self, w):
        self.w = nnx.Param(jnp.asarray(w))


class _Head(nnx.Module):
    def __init__(self, kernel, bias):
        self.kernel, self.bias = nnx.Param(jnp.asarray(kernel)), nnx.Param(jnp.asarray(bias))


class _Tiny(nnx.Module):
    """logits = mean-pooled fixed token features @ W1 (the body, ``model``) @ W2 + b (the head)."""

    def __init__(self, table, w1, w2, b):
        self.table = nnx.Variable(jnp.asarray(table))  # frozen
        self.model = _Body(w1)
        self.classifier = _Head(w2, b)

    def __call__(self, input_ids, attention_mask, positions, segment_ids):
        m = attention_mask.astype(jnp.float32)[..., None]
        x = (self.table[...][input_ids] * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return x @ self.model.w[...] @ self.classifier.kernel[...] + self.classifier.bias[...]


def _task(name, labels, rng):
    examples = [encode.Example(rng.integers(1, V, size=int(rng.integers(2, 6))).astype(np.int32), label=int(y))
                for y in labels]
    rows = packing.to_rows(examples, seq_len=8, lm=False, pack=False)
    return episodes.Task(name, rows, np.asarray(labels, np.int32), [f"{name}{c}" for c in range(max(labels) + 1)])


# ----------------------------------------------------------------------------- NumPy reference

def _np_grads(w1, w2, b, batch, table):
    """Mean cross-entropy over the real rows and its gradients, by hand (float64)."""
    ids, real = batch["input_ids"], batch["segment_ids"] > 0
    x = (table[ids] * real[..., None]).sum(1) / np.maximum(real.sum(1), 1)[:, None]
    h = x @ w1
    z = np.where(batch["label_mask"], h @ w2 + b, -np.inf)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = batch["example_mask"]
    n = max(w.sum(), 1.0)
    y = np.eye(w2.shape[1])[batch["labels"]]
    dz = (p - y) * w[:, None] / n
    loss = -(np.log(p[np.arange(len(w)), batch["labels"]]) * w).sum() / n
    return loss, x.T @ (dz @ w2.T), h.T @ dz, dz.sum(0)


def _np_meta_step(w1, batches, table, algorithm, inner_steps, inner_lr, meta_lr):
    deltas, losses = [], []
    for e in range(batches["support"]["input_ids"].shape[0]):
        support = {k: v[e] for k, v in batches["support"].items()}
        query = {k: v[e] for k, v in batches["query"].items()}
        p1, p2, pb = w1.copy(), np.zeros((D, CMAX)), np.zeros(CMAX)  # the head starts at zero
        for _ in range(inner_steps):
            _, g1, g2, gb = _np_grads(p1, p2, pb, support, table)
            p1, p2, pb = p1 - inner_lr * g1, p2 - inner_lr * g2, pb - inner_lr * gb
        loss, g1, _, _ = _np_grads(p1, p2, pb, query, table)
        deltas.append(g1 if algorithm == "fomaml" else w1 - p1)
        losses.append(loss)
    return w1 - meta_lr * np.mean(deltas, axis=0), float(np.mean(losses))


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_meta_updates_match_numpy(algorithm):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, F)).astype(np.float32)
    w1 = rng.normal(size=(F, D)).astype(np.float32)
    tasks = [_task("a", [0, 1, 2] * 4, rng), _task("b", [0, 1] * 5, rng)]
    batcher = episodes.EpisodeBatcher(tasks, k=2, q=2, seed=3, seq_len=8, pad_id=0, classification=True,
                                      num_labels=CMAX)
    model = _Tiny(table, w1, rng.normal(size=(D, CMAX)).astype(np.float32), np.ones(CMAX, np.float32))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    config = base_config()
    config.train.grad_clip = 0.0
    config.meta = meta.meta_config()
    config.meta.update(algorithm=algorithm, inner_lr=0.5, meta_lr=0.7, inner_steps=3)
    inner_tx, outer_tx = meta.inner_optimizer(config), meta.outer_optimizer(config)
    step = jnp.zeros((), jnp.int32)
    theta = meta.head_reset("classification")(params)
    state = TrainState(step=step, params=theta, opt_state=outer_tx.init(theta), rng=jnp.zeros(2, jnp.uint32))
    meta_step = jax.jit(meta.make_meta_step(graphdef, "classification", inner_tx, outer_tx,
                                            algorithm=algorithm, inner_steps=3))
    ref = w1.astype(np.float64)
    seen = set()
    for s in range(2):  # two meta-steps of two episodes each
        eps, batches = batcher.batch(2 * s, 2)
        seen.update(e.task for e in eps)
        state, metrics = meta_step(state, frozen, batches)
        ref, loss = _np_meta_step(ref, batches, table.astype(np.float64), algorithm, 3, 0.5, 0.7)
        # float32 (JAX) vs float64 (NumPy): 3 inner + 1 outer step of O(1) values
        np.testing.assert_allclose(np.asarray(jax.tree.leaves(state.params["model"])[0]), ref, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(float(metrics["query_loss"]), loss, rtol=2e-5)
        for leaf in jax.tree.leaves(state.params["classifier"]):  # never meta-learned
            assert not np.any(np.asarray(leaf))
    assert seen == {0, 1}  # both label sets went through the same program
    assert not np.allclose(ref, w1, atol=1e-3)  # the updates did move theta


# ----------------------------------------------------------------------------- episode sampler

@pytest.fixture(scope="module")
def shared_tasks():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    data = base_config().data
    data.task, data.seq_len = "classification", 32
    tasks = ml_collections.ConfigDict({"trec": presets.trec_task(SHARED), "sms_spam": presets.sms_spam_task(SHARED),
                                       "fpb": presets.financial_phrasebank_task(SHARED)})
    return episodes.load_tasks(data, tasks, tok), tok


def test_episodes_k_per_label_disjoint_seeded(shared_tasks):
    tasks, tok = shared_tasks
    assert {t.name: len(t.label_names) for t in tasks} == {"trec": 6, "sms_spam": 2, "fpb": 3}
    drawn = set()
    for i in range(30):
        ep = episodes.sample(tasks, 4, 3, seed=7, index=i)
        drawn.add(ep.task)
        labels = tasks[ep.task].labels
        c = len(tasks[ep.task].label_names)
        assert np.array_equal(np.bincount(labels[ep.support], minlength=c), np.full(c, 4))
        assert np.array_equal(np.bincount(labels[ep.query], minlength=c), np.full(c, 3))
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        again = episodes.sample(tasks, 4, 3, seed=7, index=i)
        assert again.task == ep.task and np.array_equal(again.support, ep.support)
        assert np.array_equal(again.query, ep.query)
    assert drawn == {0, 1, 2}
    other = [episodes.sample(tasks, 4, 3, seed=8, index=i) for i in range(5)]
    assert any(not np.array_equal(o.support, episodes.sample(tasks, 4, 3, seed=7, index=i).support)
               for i, o in enumerate(other))

    batcher = episodes.EpisodeBatcher(tasks, k=4, q=3, seed=7, seq_len=32, pad_id=tok.pad_token_id,
                                      classification=True, num_labels=6)
    eps, batches = batcher.batch(0, 5)
    assert batches["support"]["input_ids"].shape == (5, 24, 32)
    assert batches["query"]["input_ids"].shape == (5, 18, 32)
    for i, ep in enumerate(eps):
        c = len(tasks[ep.task].label_names)
        s = {k: v[i] for k, v in batches["support"].items()}
        assert s["example_mask"].sum() == 4 * c
        assert np.array_equal(s["labels"][:4 * c], tasks[ep.task].labels[ep.support])
        assert np.array_equal(s["label_mask"][0], np.arange(6) < c)


def test_episode_errors_name_the_problem(shared_tasks):
    tasks, _ = shared_tasks
    with pytest.raises(DataError, match=r"meta task '\w+': label '\w+' has \d+ train rows, fewer than "
                       r"config.meta.k \+ config.meta.queries = 310"):
        for i in range(40):
            episodes.sample(tasks, 300, 10, seed=0, index=i)
    cfg = base_config()
    cfg.meta = meta.meta_config()
    cfg.meta.algorithm = "maml"
    with pytest.raises(meta.MetaConfigError, match="config.meta.algorithm='maml'"):
        meta._check(cfg.meta)


# ----------------------------------------------------------------------------- end to end

def test_fewshot_study_end_to_end_tiny_bert(tmp_path):
    """Meta-training with per-episode heads (6-label head), then k-shot arms from the pretrained
    and the meta-learned LoRA weights (a 2-label head: only the non-head weights carry over)."""
    arg = ("fewshot.py:model=tiny-bert,ks=2,draws=1,steps=2,max_eval=8,meta_steps=2,meta_batch=1,"
           "meta_k=2,queries=1,inner_steps=1")
    _, text = fewshot.run_study(str(REPO / "ftjax" / "configs" / arg), tmp_path, in_process=True)
    summary = json.loads((tmp_path / "meta-fomaml" / "meta_summary.json").read_text())
    assert summary["episodes"] == 2 and summary["meta_learned_params"] > 0
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| k per label"))
    assert header == "| k per label | fine-tuned from pretrained | fine-tuned from meta-learned (fomaml) |"
    row = next(line for line in lines if line.startswith("| 2 | 0."))
    assert row.count("(n=1)") == 2
    assert any(line.startswith("| 2 | fomaml | 1 |") for line in lines)
    assert (tmp_path / "learning_curve.png").stat().st_size > 0
    arm = json.loads((tmp_path / "arms" / "fomaml-ft-k2-d0" / "config.json").read_text())
    assert arm["model"]["init_from"] == str(tmp_path / "meta-fomaml")


def _fake_arm(workdir, name, group, seed, value):
    d = workdir / "arms" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"steps": 1}}))
    (d / "run_summary.json").write_text(json.dumps(dict(
        steps=1, final={"accuracy": value}, trainable_params=1, total_params=1, tokens_seen=1, train_flops=1,
        wall_time_s=1, first_step_s=1, peak_rss_mb=1)))
    return Arm(name=name, group=group, seed=seed, overrides={})


def test_learning_curve_table_and_paired_differences(tmp_path):
    from scipy import stats as scipy_stats

    base, tuned = [0.60, 0.70, 0.65], [0.66, 0.71, 0.75]
    arms = [_fake_arm(tmp_path, f"ft-k4-d{d}", "finetune k=4", d, v) for d, v in enumerate(base)]
    arms += [_fake_arm(tmp_path, f"reptile-ft-k4-d{d}", "reptile finetune k=4", d, v) for d, v in enumerate(tuned)]
    incontext = {4: {"draws": [{"metrics": {"accuracy": a, "calibrated": {"accuracy": a + 0.1}}} for a in (0.5, 0.6)]}}
    _, text = fewshot.learning_curve(tmp_path, arms, [4], incontext, algorithms=["reptile"])
    row = next(line for line in text.splitlines() if line.startswith("| 4 | 0."))
    cells = row.strip("| ").split(" | ")[1:]
    assert [c.split(" ")[0] for c in cells] == ["0.6500", f"{np.mean(tuned):.4f}", "0.5500", "0.6500"]
    assert cells[0].startswith(f"0.6500 ± {np.std(base, ddof=1):.4f}")
    t, p = scipy_stats.ttest_rel(tuned, base)
    paired = next(line for line in text.splitlines() if line.startswith("| 4 | reptile"))
    assert paired == f"| 4 | reptile | 3 | {np.mean(tuned) - np.mean(base):+.4f} | {t:.2f} | {p:.3g} |"
