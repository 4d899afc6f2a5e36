"""Train step, ftjax vs PyTorch transformers(+peft), same weights, same batch, same AdamW.

    python benchmarks/bench_train.py            # full run: parity gate, then interleaved timing
    python benchmarks/bench_train.py --quick    # one round, 4 steps, eager PyTorch only

Cases: SmolLM2-135M (Q4_1 GGUF dequantised to float32 by both stacks) full fine-tuning and LoRA
r=8 on q/v, batch 8 x 128 tokens of SST-2 text; all-MiniLM-L6-v2 sequence classification, batch
32 x 64. Adapter and classifier-head initial values come from one numpy seed in both stacks.

Each (round, case, stack) is a fresh subprocess: load, one first step (trace + compile + run,
timed separately), then steps timed one by one to completion (``block_until_ready`` /
``loss.item()``); tokens/s is the batch's tokens over the median step time after two warm-up
steps. Round 0 runs ``--steps`` steps; later rounds run ``--timed-steps``. Parity compares each
stack's first round with ftjax's in that round (step-0 loss within 1e-4 relative, the curves
within ``--curve-rtol``). The stack order alternates between rounds; ``torch.compile`` runs in
``--compile-round`` only. The reported ratio is the median over rounds of the per-round ratio.
Stack ``ftjax-unchunked`` is ftjax with the full ``[B, T, V]`` logits (``config.train.loss_chunk=0``)
instead of its default chunked LM loss: ``--stacks=ftjax,ftjax-unchunked,torch`` measures the
chunking in the same interleaved rounds. Stack ``ftjax-bf16`` computes in bfloat16 (parameters,
gradients and AdamW state stay float32): ``--stacks=ftjax,ftjax-bf16 --steps=50`` compares its
speed and its loss curve with float32's; its step-0 gate is ``--curve-rtol``, not 1e-4.

Accelerator mode (random weights at real size, ftjax only; tokens/s/device and MFU):

    python benchmarks/bench_train.py --preset=llama3-1b --seq=2048 --batch=4 \
        --dtype=bfloat16 --remat=dots --method=full
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
CASES: dict[str, dict[str, Any]] = {
    "smollm2-full": dict(model="smollm2", method="full", batch=8, seq=128, lr=1e-4),
    "smollm2-lora": dict(model="smollm2", method="lora", batch=8, seq=128, lr=1e-3),
    "minilm-cls": dict(model="minilm", method="full", batch=32, seq=64, lr=1e-4),
    # bench_memory.py only (PyTorch has no CPU QLoRA: bitsandbytes' 4-bit kernels need CUDA).
    "smollm2-qlora": dict(model="smollm2", method="qlora", batch=8, seq=128, lr=1e-3),
}
COMPARED = ("smollm2-full", "smollm2-lora", "minilm-cls")
STACKS = ("ftjax", "torch", "torch-compile")
ADAMW = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)
LORA = dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
WARMUP_STEPS = 2  # excluded from the steady-state median (step 0 is the compile step)


# ---------------------------------------------------------------------------------------------
# The batch and the seeded initial values both stacks share
# ---------------------------------------------------------------------------------------------

def make_batch(case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Real text: packed SST-2 sentences (LM) or padded sentences with labels (classification)."""
    from transformers import AutoTokenizer
    from ftjax.models.assets import minilm_path, smollm2_gguf_path
    b, t = case["batch"], case["seq"]
    if case["model"] == "smollm2":
        path = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ids: list[int] = []
        for _, text in _common.sst2_sentences():
            ids += tok(text)["input_ids"] + [tok.eos_token_id]
            if len(ids) > b * (t + 1):
                break
        stream = np.asarray(ids[:b * (t + 1)], np.int64).reshape(b, t + 1)
        return dict(input_ids=stream[:, :-1], targets=stream[:, 1:])
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    rows = _common.sst2_sentences(b)
    enc = tok([text for _, text in rows], padding="max_length", truncation=True, max_length=t,
              return_tensors="np")
    return dict(input_ids=enc["input_ids"].astype(np.int64),
                attention_mask=enc["attention_mask"].astype(np.int64),
                labels=np.asarray([label for label, _ in rows], np.int64))


def seeded_values(case: dict[str, Any], num_layers: int, hidden: int) -> dict[str, np.ndarray]:
    """LoRA A matrices ``[L, in, r]`` (PEFT's kaiming-uniform range) or the classifier head."""
    rng = np.random.default_rng(0)
    if case["method"] in ("lora", "qlora"):
        bound = 1 / np.sqrt(hidden)
        shape = (num_layers, hidden, LORA["rank"])
        return {name: rng.uniform(-bound, bound, shape).astype(np.float32)
                for name in LORA["targets"]}
    if case["model"] == "minilm":
        return dict(kernel=rng.normal(0, 0.02, (hidden, 2)).astype(np.float32),
                    bias=np.zeros(2, np.float32))
    return {}


# ---------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------------------------

def _timed_steps(step: Callable[[], float], steps: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return losses, times


def ftjax_worker(case: dict[str, Any], batch: dict[str, np.ndarray], steps: int,
                 chunked: bool = True, dtype: str = "float32") -> dict[str, Any]:
    """ftjax's run; ``chunked=False`` (stack ``ftjax-unchunked``) materialises the full logits
    (``config.train.loss_chunk=0``) instead of the default chunked LM loss; ``dtype`` is the
    compute dtype (stack ``ftjax-bf16``: bfloat16 compute, float32 parameters and optimizer)."""
    import jax
    from ftjax import sharding
    from ftjax.models.assets import minilm_path, smollm2_gguf_path
    from ftjax.models.loading import from_pretrained
    from ftjax.config import base_config
    from ftjax.train import memory

    start = time.perf_counter()
    mesh = sharding.make_mesh({"fsdp": 1})
    if case["model"] == "smollm2":
        model, _ = from_pretrained(smollm2_gguf_path(), mesh=mesh, dtype=dtype, param_dtype="float32")
        inputs = _common.lm_batch(np.concatenate([batch["input_ids"], batch["targets"][:, -1:]], 1))
    else:
        # pooler: what transformers' BertForSequenceClassification pools (ftjax's default for
        # this sentence-transformers checkpoint is its own mean pooling)
        model, _ = from_pretrained(minilm_path(), head="sequence_classification", num_labels=2,
                                   mesh=mesh, pooling="pooler")
        b, t = batch["input_ids"].shape
        inputs = dict(input_ids=batch["input_ids"].astype(np.int32),
                      segment_ids=batch["attention_mask"].astype(np.int32),
                      positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                      labels=batch["labels"].astype(np.int32), example_mask=np.ones(b, np.int32))
    cfg = model.model.cfg
    values = seeded_values(case, cfg.num_layers, cfg.hidden_size)

    adapter = case["method"] in ("lora", "qlora")

    def init(m: Any) -> None:
        owner = m.model.layers.self_attn if adapter else getattr(m, "classifier", None)
        for name, value in values.items():
            var = getattr(owner, name).lora_a if adapter else getattr(owner, name)
            var.set_value(jax.device_put(value, var.get_value().sharding))

    trainer = _common.FtjaxTrainer(
        model, inputs, mesh, method=case["method"], kind="lm" if case["model"] == "smollm2" else
        "classification", learning_rate=case["lr"], train=ADAMW if chunked else dict(ADAMW, loss_chunk=0),
        lora=dict(rank=LORA["rank"], alpha=LORA["alpha"]), init=init)
    load_s = time.perf_counter() - start
    rss_loaded = _common.rss_mb()
    est = memory.estimate(trainer.params, trainer.frozen, trainer.tx, mesh, cfg,
                          batch_size=case["batch"], seq_len=case["seq"], remat=cfg.remat,
                          loss_chunk=base_config().train.loss_chunk if chunked else 0)
    losses, times = _timed_steps(trainer.step, steps)
    return dict(losses=losses, step_s=times, load_s=load_s, rss_after_load_mb=rss_loaded,
                trainable=trainer.num_trainable, optimizer_bytes=trainer.optimizer_bytes(),
                estimate_mb=est.total / 2 ** 20)


def torch_worker(case: dict[str, Any], batch: dict[str, np.ndarray], steps: int,
                 compile_model: bool) -> dict[str, Any]:
    import torch
    import transformers
    from ftjax.models.assets import minilm_path, smollm2_gguf_path

    start = time.perf_counter()
    if case["model"] == "smollm2":
        path = smollm2_gguf_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(minilm_path()), num_labels=2, dtype=torch.float32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
    cfg = model.config
    values = seeded_values(case, cfg.num_hidden_layers, cfg.hidden_size)
    if case["method"] == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=list(LORA["targets"]),
            lora_dropout=0.0))
        with torch.no_grad():
            for i, layer in enumerate(model.base_model.model.model.layers):
                for name, a in values.items():
                    lora_a = getattr(layer.self_attn, name).lora_A["default"].weight
                    lora_a.copy_(torch.from_numpy(a[i].T))
    elif values:
        with torch.no_grad():
            model.classifier.weight.copy_(torch.from_numpy(values["kernel"].T))
            model.classifier.bias.copy_(torch.from_numpy(values["bias"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=case["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    forward = torch.compile(model) if compile_model else model
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    load_s = time.perf_counter() - start
    rss_loaded = _common.rss_mb()

    def one_step() -> float:
        if case["model"] == "smollm2":
            logits = forward(input_ids=tensors["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), tensors["targets"].reshape(-1))
        else:
            logits = forward(input_ids=tensors["input_ids"],
                             attention_mask=tensors["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), tensors["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, ADAMW["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, times = _timed_steps(one_step, steps)
    opt_bytes = sum(v.nbytes for state in opt.state.values() for v in state.values()
                    if torch.is_tensor(v))
    return dict(losses=losses, step_s=times, load_s=load_s, rss_after_load_mb=rss_loaded,
                trainable=sum(p.numel() for p in trainable), optimizer_bytes=opt_bytes,
                threads=torch.get_num_threads())


def worker(spec: dict[str, Any]) -> None:
    case = CASES[spec["case"]]
    batch = dict(np.load(spec["batch"]))
    if spec["stack"].startswith("ftjax"):
        out = ftjax_worker(case, batch, spec["steps"], chunked=spec["stack"] != "ftjax-unchunked",
                           dtype="bfloat16" if spec["stack"] == "ftjax-bf16" else "float32")
    else:
        out = torch_worker(case, batch, spec["steps"],
                           compile_model=spec["stack"] == "torch-compile")
    tokens = int(batch["input_ids"].size)
    steady = out["step_s"][WARMUP_STEPS:] or out["step_s"][1:]
    out.update(spec, tokens_per_step=tokens, first_step_s=out["step_s"][0],
               tokens_per_s=tokens / statistics.median(steady) if steady else None,
               peak_rss_mb=_common.peak_rss_mb())
    _common.emit(out)


# ---------------------------------------------------------------------------------------------
# Orchestration and report
# ---------------------------------------------------------------------------------------------

def parity(ref: dict[str, Any], got: dict[str, Any], curve_rtol: float,
           step0_rtol: float = 1e-4) -> dict[str, Any]:
    """Step-0 relative loss difference (gate ``step0_rtol``) and the largest over the shared curve."""
    a, b = np.asarray(ref["losses"]), np.asarray(got["losses"])
    n = min(len(a), len(b))
    rel = np.abs(a[:n] - b[:n]) / np.abs(a[:n])
    return dict(step0_rel=float(rel[0]), curve_max_rel=float(rel.max()),
                curve_max_abs=float(np.abs(a[:n] - b[:n]).max()), steps=n,
                passed=bool(rel[0] <= step0_rtol and rel.max() <= curve_rtol))


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: list[dict[str, Any]], cases: list[str], stacks: list[str],
              curve_rtol: float) -> dict[str, Any]:
    """Per case and stack: medians, parity with ftjax (first shared round) and speed ratios.

    A ratio is ftjax's tokens/s over the other stack's in the same round; the median over
    rounds is reported.
    """
    out: dict[str, Any] = {}
    for case in cases:
        mine = [r for r in runs if r["case"] == case]
        ok = {s: {r["round"]: r for r in mine if r["stack"] == s and "error" not in r} for s in stacks}
        row: dict[str, Any] = dict(stacks={}, parity={}, ratios={})
        for s in stacks:
            done = list(ok[s].values())
            row["stacks"][s] = dict(
                {k: _median([r[k] for r in done]) for k in
                 ("tokens_per_s", "first_step_s", "load_s", "peak_rss_mb")},
                runs=len(done), errors=[r["error"] for r in mine if r["stack"] == s and "error" in r])
            shared = [rnd for rnd in sorted(ok[s]) if rnd in ok["ftjax"]] if s != "ftjax" else []
            if shared:
                row["parity"][s] = parity(ok[s][shared[0]], ok["ftjax"][shared[0]], curve_rtol,
                                          curve_rtol if s == "ftjax-bf16" else 1e-4)
                ratios = [ok["ftjax"][r]["tokens_per_s"] / ok[s][r]["tokens_per_s"] for r in shared]
                row["ratios"][s] = dict(median=statistics.median(ratios), per_round=ratios)
        out[case] = row
    return out


def report(summary: dict[str, Any]) -> str:
    rows, gates = [], []
    for case, row in summary.items():
        for s, st in row["stacks"].items():
            ratio = row["ratios"].get(s)
            note = "; ".join(e.splitlines()[-1][:80] for e in st["errors"][:1])
            speedup = (f"{ratio['median']:.2f}x (" + ", ".join(f"{x:.2f}" for x in ratio["per_round"])
                       + ")") if ratio else ""
            rows.append([case, s, st["tokens_per_s"], speedup,
                         st["first_step_s"], st["load_s"], st["peak_rss_mb"], st["runs"], note])
        for s, p in row["parity"].items():
            gates.append([case, f"ftjax vs {s}", f"{p['step0_rel']:.1e}", f"{p['curve_max_rel']:.1e}",
                          f"{p['curve_max_abs']:.1e}", p["steps"], "pass" if p["passed"] else "FAIL"])
    table = _common.markdown_table(
        ["case", "stack", "tokens/s", "ftjax speed-up: median (per round)", "first step s",
         "load s", "peak RSS MiB", "runs", "error"], rows)
    gate = _common.markdown_table(["case", "pair", "step-0 rel diff", "max rel diff (curve)",
                                   "max abs diff (curve)", "steps", "gate"], gates)
    return f"### Train step\n\n{table}\n\n### Parity gate\n\n{gate}\n"


def compare(args: argparse.Namespace) -> None:
    import tempfile
    cases = args.cases.split(",")
    stacks = args.stacks.split(",")
    batches = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    for case in cases:
        batches[case] = tmp / f"{case}.npz"
        np.savez(batches[case], **make_batch(CASES[case]))
    runs, start = [], time.perf_counter()
    for rnd in range(args.rounds):
        order = [s for s in stacks if s != "torch-compile" or rnd == args.compile_round]
        for case in cases:
            for stack in order if rnd % 2 == 0 else order[::-1]:
                steps = args.steps if rnd == 0 else args.timed_steps
                spec = dict(case=case, stack=stack, steps=steps, round=rnd, batch=str(batches[case]))
                result = _common.run_worker(SCRIPT, spec, timeout=args.worker_timeout)
                result.update(case=case, stack=stack, round=rnd)
                runs.append(result)
                print(f"round {rnd} {case:13s} {stack:13s} " + (
                    f"error: {result['error'].splitlines()[-1][:100]}" if "error" in result else
                    f"{result['tokens_per_s']:8.1f} tok/s  first step {result['first_step_s']:6.1f}s  "
                    f"rss {result['peak_rss_mb']:6.0f} MiB  loss {result['losses'][0]:.6f}"),
                    flush=True)
    summary = summarise(runs, cases, stacks, args.curve_rtol)
    payload = dict(machine=_common.machine(), settings=vars(args), wall_s=time.perf_counter() - start,
                   cases=CASES, adamw=ADAMW, lora=LORA, summary=summary, runs=runs)
    name = args.name or ("train_quick" if args.quick else "train")
    print(_common.write_results(name, payload, report(summary)).read_text())


# ---------------------------------------------------------------------------------------------
# Accelerator mode: ftjax alone at real size, random weights
# ---------------------------------------------------------------------------------------------

def accelerator(args: argparse.Namespace) -> None:
    import jax
    from ftjax.config import base_config
    from ftjax import sharding
    from ftjax.models.loading import from_pretrained
    from ftjax.train import memory
    from ftjax.train.flops import peak_flops_per_device, train_flops_per_token

    mesh = sharding.make_mesh({"fsdp": -1})
    start = time.perf_counter()
    model, _ = from_pretrained(args.preset, mesh=mesh, dtype=args.dtype, param_dtype=args.param_dtype,
                               scan_layers=args.scan, remat=args.remat)
    # 6 FLOPs per weight and token when it trains, 4 (forward + input gradient) when frozen.
    flops = train_flops_per_token(model, args.seq)
    base_weights = train_flops_per_token(model, 0) / 6.0  # the matmul weights, adapters aside
    stream = np.random.default_rng(0).integers(0, model.model.cfg.vocab_size,
                                               (args.batch, args.seq + 1), dtype=np.int32)
    trainer = _common.FtjaxTrainer(model, _common.lm_batch(stream), mesh, method=args.method,
                                   train=ADAMW)
    if args.method != "full":
        flops += 6.0 * trainer.num_trainable - 2.0 * base_weights
    estimate = memory.estimate(trainer.params, trainer.frozen, trainer.tx, mesh, model.model.cfg,
                               batch_size=args.batch, seq_len=args.seq, remat=args.remat,
                               loss_chunk=base_config().train.loss_chunk)
    print(estimate.summary(), flush=True)
    load_s = time.perf_counter() - start

    losses, times = _timed_steps(trainer.step, args.steps)
    tokens_per_s = args.batch * args.seq / statistics.median(times[WARMUP_STEPS:] or times[1:])
    devices = jax.device_count()
    peak = peak_flops_per_device()
    stats = jax.local_devices()[0].memory_stats() or {}
    result = dict(preset=args.preset, method=args.method, seq=args.seq, batch=args.batch,
                  dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, scan=args.scan,
                  device=jax.devices()[0].device_kind, devices=devices, load_s=load_s,
                  first_step_s=times[0], losses=losses,
                  tokens_per_s_per_device=tokens_per_s / devices, flops_per_token=flops,
                  mfu=tokens_per_s / devices * flops / peak if peak else None,
                  estimate_gib=estimate.total / 2 ** 30,
                  device_peak_gib=stats["peak_bytes_in_use"] / 2 ** 30
                  if "peak_bytes_in_use" in stats else None,
                  peak_rss_mb=_common.peak_rss_mb())
    keys = ("preset", "method", "device", "devices", "seq", "batch", "dtype", "remat",
            "tokens_per_s_per_device", "mfu", "first_step_s", "estimate_gib", "device_peak_gib")
    table = _common.markdown_table(
        ["preset", "method", "device", "devices", "seq", "batch", "dtype", "remat",
         "tokens/s/device", "MFU", "first step s", "estimate GiB", "device peak GiB"],
        [[result[k] for k in keys]])
    name = f"train_{args.preset}_{args.method}"
    print(_common.write_results(name, dict(machine=_common.machine(), result=result), table).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round of 4 steps, eager PyTorch only")
    p.add_argument("--name", default="", help="results/NAME.{json,md} (default train, train_quick)")
    p.add_argument("--cases", default=",".join(COMPARED))
    p.add_argument("--stacks", default=",".join(STACKS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0,
                   help="steps of round 0, the parity curve (20); accelerator mode: steps (10)")
    p.add_argument("--timed-steps", type=int, default=6, help="steps of later rounds")
    p.add_argument("--compile-round", type=int, default=1,
                   help="the one round that also runs torch.compile (its compile takes minutes)")
    p.add_argument("--curve-rtol", type=float, default=1e-2)
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--preset", default="", help="accelerator mode: a model preset, random weights")
    p.add_argument("--method", default="full", help="accelerator mode: full | lora | ...")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", default="dots")
    p.add_argument("--scan", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
    elif args.preset:
        args.steps = args.steps or 10
        accelerator(args)
    else:
        if args.quick:
            args.rounds, args.steps, args.stacks = 1, 4, "ftjax,torch"
        args.steps = args.steps or 20
        compare(args)


if __name__ == "__main__":
    main()
