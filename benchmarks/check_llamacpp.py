"""llama.cpp runs ftjax's GGUF exports as transformers runs the matching Hugging Face export:
prompt tokens and greedy continuations (a check, outside the test suite).

    python benchmarks/check_llamacpp.py [--workdir=/tmp/ftjax-llamacpp] [--steps=4]
        [--llamacpp_python=/work/llamacpp-venv/bin/python] [--install] [--only=M,..]
        [--dtypes=f32,q8_0,q4_0,q4_k] [--prepare] [--tamper=swap|rope|eps] [--time]

``--install`` first creates that venv and builds ``llama-cpp-python==0.3.36`` from its sdist
into it (about 12 minutes of both cores on an idle machine; the build runs at ``nice 15``).
``--prepare`` only trains and exports (cached in ``--workdir``), so llama.cpp can run later.

Models: a short LoRA run of ``configs/smollm2_lm.py`` (``--steps``), exported with
``ftjax-export`` as ``--format=hf`` and as ``--format=gguf`` in every ``--dtypes``; and one tiny
random model of every other family llama.cpp runs (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3,
GPT-2; SmolLM2's tokenizer, unit-scale weights so greedy argmaxes are not near-ties), written by
ftjax both ways (``save_pretrained`` and ``save_gguf``). Prompts: contractions, numbers,
whitespace runs, non-ASCII, and one chat-templated prompt.

llama.cpp (``llama-cpp-python``, run in ``--llamacpp_python``) tokenizes each prompt (special
tokens parsed) and continues it greedily for 32 tokens with a plain argmax loop, keeping its top
8 logits at every step. transformers, on the HF export, then reads the prompt plus llama.cpp's
continuation in one forward pass (teacher forcing), so every one of the 32 steps is scored
against transformers' logits at the same context. For a quantised file transformers runs the
arithmetic llama.cpp's CPU backend does: every weight the file holds quantised is rounded
through that type (the ``gguf`` package's quantiser and dequantiser; Q4_K's quantiser is
ftjax's, the ``gguf`` package has none), the activations entering each such matmul are rounded
as llama.cpp rounds them (Q8_0 blocks of 32 with an F16 scale for Q8_0/Q4_0/Q5_0 weights, Q8_K
blocks of 256 for K-quants, F16 for F16 weights), GELU goes through ggml's F16 lookup table, and
attention through its F16 KV cache (Q and the softmax probabilities rounded to F16 for the F16
matmuls). Which type each tensor has is read from the file. That reference agrees with llama.cpp
to 0.001 at most steps; where it does not, an activation sat within float noise of a rounding
boundary and the two rounded it to neighbouring steps (the same reference in float64 differs from
itself the same way: its ``noise``). A file passes when, on every prompt,

* the prompt tokens equal the HF tokenizer's, and
* llama.cpp's token is transformers' argmax at each of the 32 steps, or (a quantised file only)
  transformers' second choice with a top-2 gap below ``2 * LOGIT_TOL[dtype]`` (a near-tie), and
* at each step llama.cpp's 8 largest logits are within the file's bound of transformers' logits
  for the same token ids: ``LOGIT_TOL[dtype]``, or for a quantised file the largest ``noise``
  (float32 vs float64 reference, same ids) over its prompts when that is larger.

So F32 files must continue exactly as plain transformers does. The table also scores every
quantised file against the unquantised HF export with the same rule ("vs F32"; informational:
weight rounding moves logits by more than the tolerance). ``--tamper=KIND`` checks a deliberately
broken copy of each file instead (``swap``: blocks 0 and 1 exchange ``attn_output``; ``rope``:
rope frequency base doubled; ``eps``: norm epsilon times 1e4): every row should then FAIL.

``--time`` (run it under ``/work/tools/cpu bench``) only times: llama.cpp's decode tokens/s for
``--time_model``'s F32 and Q8_0 exports beside ftjax's own generator on its HF export, same
prompts, greedy, 32 new tokens, batch 1, llama.cpp ``n_threads=2``, median of 3 per prompt.
Results: ``benchmarks/results/llamacpp.{json,md}`` (``llamacpp_time.*`` for ``--time``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
NEW_TOKENS = 32
TOP_K = 8
DTYPES = ("f32", "q8_0", "q4_0", "q4_k")
# max |llama.cpp logit - transformers logit| over llama.cpp's top 8 at each step (see the note in
# benchmarks/RESULTS.md for the measured values): F32 against plain transformers differs by
# llama.cpp's F16 KV cache, F16 GELU table and summation order; a quantised file, against
# transformers computing as llama.cpp does, by whole rounding steps where an activation sits
# within float noise of a rounding boundary (bounded per file by the reference's own ``noise``).
LOGIT_TOL = {"f32": 0.02, "q8_0": 0.05, "q4_0": 0.05, "q4_k": 0.05}
SAME = 1e-3  # a step whose top-8 logits agree this closely ran the same arithmetic
PROMPTS = ["it's a charming and often affecting journey.",
           "I'm sure we'll win 3-2, won't we? They've said 12345 times it's 3.14159...",
           "Naïve café — 東京 🦙\n\n\tindented    runs   of spaces",
           "CHAT:What's the capital of France? Don't guess, and isn't it Paris?"]
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_configs() -> dict[str, Any]:
    import transformers
    t = transformers
    return {
        "llama": t.LlamaConfig(**TINY),
        "mistral": t.MistralConfig(**TINY, sliding_window=None),
        "qwen2": t.Qwen2Config(**TINY, tie_word_embeddings=True),
        "qwen3": t.Qwen3Config(**TINY),
        "gemma": t.GemmaConfig(**TINY),
        "gemma2": t.Gemma2Config(**TINY, query_pre_attn_scalar=16, sliding_window=4,
                                 attn_logit_softcapping=20.0, final_logit_softcapping=15.0),
        "gemma3": t.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6}, query_pre_attn_scalar=16,
                                     sliding_window=4),
        "gpt2": t.GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2),
    }


def prompt_texts(tokenizer: Any) -> list[str]:
    """The prompts as text (the chat one through the tokenizer's own template)."""
    out = []
    for p in PROMPTS:
        if p.startswith("CHAT:"):
            p = tokenizer.apply_chat_template([{"role": "user", "content": p[5:]}],
                                              add_generation_prompt=True, tokenize=False)
        out.append(p)
    return out


def _unit_scale(model: Any, seed: int = 0) -> Any:
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_" in name else
                    noise if "embed" in name or "wte" in name or "wpe" in name or p.ndim == 1
                    else noise / p.shape[-1] ** 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Building the exports (ftjax)
# ---------------------------------------------------------------------------------------------

def smollm2_run(root: Path, steps: int, dtypes: list[str]) -> list[dict]:
    """LoRA run of configs/smollm2_lm.py, exported as HF and as GGUF in every dtype."""
    from ftjax.configs.smollm2_lm import get_config
    from ftjax.export import export_run
    from ftjax.train.loop import train
    workdir = root / "smollm2_lora"
    if not (workdir / "config.json").exists():
        config = get_config(f"steps={steps},batch=4,seq_len=64")
        config.mesh.num_devices = 1
        config.eval.max_batches = 1
        config.checkpoint.async_save = False
        train(config, workdir)
    if not (root / "smollm2_hf").exists():
        export_run(workdir, "hf", root / "smollm2_hf")
    rows = []
    for dtype in dtypes:
        out = root / f"smollm2_gguf_{dtype}"
        if not out.exists():
            export_run(workdir, "gguf", out, gguf_dtype=dtype)
        rows.append(dict(model="smollm2-lora", dtype=dtype, gguf=str(out / f"model-{dtype}.gguf"),
                         hf=str(root / "smollm2_hf")))
    return rows


def tiny_models(root: Path, tokenizer: Any, dtypes: list[str]) -> list[dict]:
    import jax
    import transformers
    from ftjax import sharding
    from ftjax.export import save_gguf
    from ftjax.models.loading import from_pretrained
    from ftjax.models.saving import save_pretrained
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    rows = []
    for name, config in tiny_configs().items():
        folder = root / f"tiny_{name}"
        src, hf = folder / "torch", folder / "hf"
        model = None
        if not src.exists():
            _unit_scale(transformers.AutoModelForCausalLM.from_config(config)).save_pretrained(src)
        for dtype in dtypes:
            if not (folder / f"model-{dtype}.gguf").exists() or not hf.exists():
                if model is None:
                    model = from_pretrained(src, mesh=mesh)[0]
                if not hf.exists():
                    save_pretrained(model, hf, tokenizer)
                save_gguf(model, tokenizer, folder / f"model-{dtype}.gguf", dtype)
            rows.append(dict(model=f"tiny-{name}", dtype=dtype,
                             gguf=str(folder / f"model-{dtype}.gguf"), hf=str(hf)))
    return rows


def tamper(gguf_path: str, kind: str) -> str | None:
    """A copy of the file broken on purpose (None when ``kind`` does not apply to it)."""
    import shutil
    import gguf
    out = gguf_path.replace(".gguf", f".tampered-{kind}.gguf")
    shutil.copyfile(gguf_path, out)
    reader = gguf.GGUFReader(out, "r+")
    if kind == "swap":
        t = {x.name: x for x in reader.tensors}
        a, b = t["blk.0.attn_output.weight"].data, t["blk.1.attn_output.weight"].data
        a0 = a.copy()
        a[...] = b
        b[...] = a0
    else:
        suffix = {"rope": ".rope.freq_base", "eps": "layer_norm_rms_epsilon"}[kind]
        keys = [k for k in reader.fields if k.endswith(suffix) or
                (kind == "eps" and k.endswith(".attention.layer_norm_epsilon"))]
        if not keys:
            os.remove(out)
            return None
        for k in keys:
            field = reader.fields[k]
            field.parts[field.data[0]][0] *= 2.0 if kind == "rope" else 1e4
    reader.data.flush()
    return out


# ---------------------------------------------------------------------------------------------
# transformers as llama.cpp computes a file: its weights' types, its activation roundings
# ---------------------------------------------------------------------------------------------

def _round_blocks(x: Any, block: int, f16_scale: bool) -> Any:
    """Symmetric 8-bit rounding in blocks along the last axis, as ``quantize_row_q8_0``
    (``f16_scale``: the scale is stored as F16) and ``quantize_row_q8_K`` do."""
    import torch
    b = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    d = amax / 127.0
    if f16_scale:
        d = d.half().float()
    return (torch.round(b * inv) * d).reshape(x.shape)


def _activation_rounding(qtype: Any) -> Any:
    """How llama.cpp's CPU backend rounds a matmul's activations for weights of ``qtype``
    (its ``vec_dot_type``), or None."""
    import gguf
    import torch
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        return lambda x: _round_blocks(x, 32, True)
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return lambda x: _round_blocks(x, 256, False)
    if qtype in (Q.F16, Q.BF16):
        dt = torch.float16 if qtype == Q.F16 else torch.bfloat16
        return lambda x: x.to(dt).to(x.dtype)
    return None


def _f16(x: Any) -> Any:
    return x.half().to(x.dtype)


def _gelu_lut(x: Any) -> Any:
    """ggml's CPU GELU (``GGML_GELU_FP16`` in ggml-cpu/vec.h): the input rounded to F16 and looked
    up in a table of F16 tanh-GELU values; inputs beyond +-10 bypass the table."""
    import torch
    table = _f16(torch.nn.functional.gelu(_f16(x), approximate="tanh"))
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, table))


def _llamacpp_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                        scaling: float | None = None, dropout: float = 0.0,
                        softcap: float | None = None, **_: Any) -> tuple[Any, Any]:
    """Attention as llama.cpp's CPU backend computes it without flash attention
    (llm_graph_context::build_attn_mha): K and V rounded to its F16 KV cache, Q to F16 for the
    F16 K x Q product (Gemma 2/3 scale Q before that), the softmax probabilities to F16 for the
    product with the F16 V; soft-cap and mask as transformers' eager attention."""
    import torch
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    rep = query.shape[1] // key.shape[1]
    k = _f16(key).repeat_interleave(rep, 1)
    v = _f16(value).repeat_interleave(rep, 1)
    if module.config.model_type in ("gemma2", "gemma3_text"):
        w = _f16(query * scaling) @ k.transpose(-1, -2)
    else:
        w = (_f16(query) @ k.transpose(-1, -2)) * scaling
    if softcap:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : k.shape[-2]]
    probs = torch.softmax(w, dim=-1)
    return (_f16(probs) @ v).transpose(1, 2).contiguous(), probs


def as_llamacpp_computes(model: Any, gguf_path: str) -> Any:
    """Round ``model``'s weights to the types ``gguf_path`` holds them in, its matmul inputs as
    llama.cpp does for those types (forward pre-hooks), its GELU through ggml's F16 table and
    its attention through the F16 KV cache (``_llamacpp_attention``)."""
    import gguf
    import numpy as np
    import torch
    import transformers
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from ftjax.models.gguf_io import quants
    reader = gguf.GGUFReader(gguf_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)

    def gguf_name(module_name: str) -> str:
        if module_name == "lm_head":  # tied heads read token_embd
            return "output.weight" if "output.weight" in types else "token_embd.weight"
        name = names.get_name(module_name)
        if name is None or f"{name}.weight" not in types:
            raise KeyError(f"{gguf_path}: no GGUF tensor for transformers module {module_name}")
        return f"{name}.weight"

    Q = gguf.GGMLQuantizationType
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if type(module).__name__ in ("NewGELUActivation", "GELUTanh"):  # tanh-approximate
                module.register_forward_hook(lambda _, args, out: _gelu_lut(args[0]))
            weight = getattr(module, "weight", None)
            if weight is None or weight.ndim != 2:
                continue
            qtype = types[gguf_name(module_name)]
            conv1d = type(module).__name__ == "Conv1D"  # GPT-2: [in, out], a GGUF row is [in]
            tied_head = module_name == "lm_head" and weight is embedding  # rounded as the embedding
            if qtype != Q.F32 and not tied_head:
                w = np.ascontiguousarray((weight.T if conv1d else weight).numpy())
                back = gguf.quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape)
                weight.copy_(torch.from_numpy(np.ascontiguousarray(back.T if conv1d else back)))
            if isinstance(module, torch.nn.Embedding):
                continue
            rounding = _activation_rounding(qtype)
            if rounding is not None:
                module.register_forward_pre_hook(lambda _, args, r=rounding: (r(args[0]),))
    transformers.AttentionInterface.register("llamacpp", _llamacpp_attention)
    AttentionMaskInterface.register("llamacpp", eager_mask)
    model.set_attn_implementation("llamacpp")
    return model


def load_reference(hf: str, gguf_path: str | None) -> Any:
    """transformers on the HF export (float32), as llama.cpp computes ``gguf_path`` if given."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    return as_llamacpp_computes(model, gguf_path) if gguf_path else model


def _logits(model: Any, prompt: list[int], cont: list[int]) -> Any:
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + cont[:-1]])).logits[0, len(prompt) - 1:]
    return out.double()


def score(model: Any, prompt: list[int], cpp: dict, flips_allowed: bool, tol: float,
          twin: Any = None) -> dict:
    """Teacher-forced: transformers' logits on prompt + llama.cpp's continuation, step by step
    against llama.cpp's token and top logits. ``twin`` (the same model in float64) gives the
    reference's own rounding noise on llama.cpp's top ids (``noise``)."""
    import torch
    cont = cpp["continuation"]
    logits = _logits(model, prompt, cont)
    other = _logits(twin, prompt, cont) if twin is not None else logits
    steps = []
    for j, tok in enumerate(cont):
        row = logits[j]
        top2 = torch.topk(row, 2)
        ids, vals = cpp["top_ids"][j], torch.tensor(cpp["top_logits"][j], dtype=row.dtype)
        steps.append(dict(err=float((row[ids] - vals).abs().max()),
                          noise=float((row[ids] - other[j][ids]).abs().max()),
                          top=int(top2.indices[0]), second=int(top2.indices[1]),
                          gap=float(top2.values[0] - top2.values[1]), tok=tok))
    exact = sum(s["tok"] == s["top"] for s in steps)
    flips = [dict(pos=j, gap=s["gap"]) for j, s in enumerate(steps) if s["tok"] != s["top"]]
    tokens_ok = all(s["tok"] == s["top"] or (flips_allowed and s["tok"] == s["second"] and
                                             s["gap"] < 2 * tol) for s in steps)
    err = max(s["err"] for s in steps)
    return dict(exact=exact, flips=flips, max_err=err, tokens_ok=tokens_ok,
                same_steps=sum(s["err"] <= SAME for s in steps),
                noise=max(s["noise"] for s in steps), passed=tokens_ok and err <= tol)


# ---------------------------------------------------------------------------------------------
# llama.cpp (runs in --llamacpp_python) and ftjax's generator
# ---------------------------------------------------------------------------------------------

def llamacpp_worker(spec: dict) -> dict:
    """Tokenize and greedily continue every text with llama.cpp (its top logits at each step,
    unless timed); decode seconds per prompt (median over ``repeats``)."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=spec["gguf"], n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    meta = {k: llm.metadata.get(k) for k in ("tokenizer.ggml.pre", "general.architecture")}
    out = []
    for text in spec["texts"]:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        runs = []
        for _ in range(spec["repeats"]):
            llm.reset()
            llm.eval(ids)
            tokens, top_ids, top_logits = [], [], []
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):  # the last position's logits, as llama.cpp returns them
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
                nxt = int(np.argmax(logits))
                tokens.append(nxt)
                if not spec["timed"]:
                    best = np.argpartition(logits, -TOP_K)[-TOP_K:]
                    top_ids.append(best.tolist())
                    top_logits.append(logits[best].tolist())
                llm.eval([nxt])
            runs.append(time.perf_counter() - start)
        out.append(dict(prompt=ids, continuation=tokens, top_ids=top_ids, top_logits=top_logits,
                        decode_s=statistics.median(runs)))
    return dict(meta=meta, results=out)


LLAMACPP = "llama-cpp-python==0.3.36"


def install_llamacpp(python: str) -> None:
    """A venv at ``python``'s prefix with llama-cpp-python built from source (no prebuilt wheel)."""
    venv = Path(python).parents[1]
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(["nice", "-n", "15", python, "-m", "pip", "install", "--no-binary",
                    "llama-cpp-python", LLAMACPP], check=True,
                   env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})


def check_llamacpp_python(python: str) -> None:
    proc = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"error: {python} cannot import llama_cpp ({proc.stderr.strip().splitlines()[-1:]}); "
                 f"pass --install to build {LLAMACPP} there, or --llamacpp_python=PYTHON")


def run_llamacpp(python: str, gguf: str, texts: list[str], repeats: int = 1,
                 timed: bool = False) -> dict:
    spec = json.dumps(dict(gguf=gguf, texts=texts, repeats=repeats, timed=timed))
    proc = subprocess.run([python, str(SCRIPT), "--llamacpp_worker", spec], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp worker failed on {gguf}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ftjax_decode_s(hf: str, prompt_ids: list[list[int]], repeats: int) -> list[float]:
    """ftjax's Generator (jitted KV-cache decode) on the HF export: seconds per decode step
    ((the 32-token run - the 1-token run) / 31: prefill and first token excluded)."""
    from ftjax.generate import Generator, Request, SamplingParams
    from ftjax.models.loading import from_pretrained
    model, tokenizer = from_pretrained(hf)
    gen = Generator(model, tokenizer)

    def run(ids: list[int], k: int) -> float:
        start = time.perf_counter()
        gen.generate([Request(ids, SamplingParams(max_new_tokens=k, stop_token_ids=()))])
        return time.perf_counter() - start
    out = []
    for ids in prompt_ids:
        run(ids, 1), run(ids, NEW_TOKENS)  # compile both shapes
        full = statistics.median(run(ids, NEW_TOKENS) for _ in range(repeats))
        first = statistics.median(run(ids, 1) for _ in range(repeats))
        out.append((full - first) / (NEW_TOKENS - 1))
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def check(rows: list[dict], texts: list[str], tokenizer_ids: list[list[int]], python: str,
          tamper_kind: str) -> tuple[list[dict], bool]:
    """llama.cpp on every file, scored against transformers; the table's rows and whether all
    passed."""
    plain: dict[str, Any] = {}
    table, ok = [], True
    for row in rows:
        gguf_path = tamper(row["gguf"], tamper_kind) if tamper_kind else row["gguf"]
        if gguf_path is None:
            continue
        cpp = run_llamacpp(python, gguf_path, texts)
        if row["hf"] not in plain:
            plain[row["hf"]] = load_reference(row["hf"], None)
        quantised = row["dtype"] != "f32"
        same = load_reference(row["hf"], gguf_path) if quantised else plain[row["hf"]]
        twin = copy.deepcopy(same).double() if quantised else None
        tol = LOGIT_TOL[row["dtype"]]
        scores = [score(same, c["prompt"], c, quantised, tol, twin) for c in cpp["results"]]
        # a quantised file's bound: the tolerance, or the reference's own float32-vs-float64
        # rounding noise on this file's prompts when that is larger
        bound = max([tol] + [s["noise"] for s in scores]) if quantised else tol
        for i, (ids, c, s) in enumerate(zip(tokenizer_ids, cpp["results"], scores)):
            s["bound"] = bound
            s["passed"] = s["tokens_ok"] and s["max_err"] <= bound
            vs_f32 = score(plain[row["hf"]], c["prompt"], c, True, tol) if quantised else s
            passed = c["prompt"] == ids and s["passed"]
            ok &= passed
            table.append(dict(model=row["model"], dtype=row["dtype"], prompt=i, gguf=gguf_path,
                              pre=cpp["meta"]["tokenizer.ggml.pre"], prompt_tokens=len(c["prompt"]),
                              prompt_match=c["prompt"] == ids, score=s, vs_f32=vs_f32,
                              passed=passed, llamacpp=c))
        del same, twin
        print(f"{row['model']:>16} {row['dtype']:>5}: " + " ".join(
            f"[{'tok' if t['prompt_match'] else 'TOK DIFF'} {t['score']['exact']}/{NEW_TOKENS} "
            f"err {t['score']['max_err']:.3f} {'ok' if t['passed'] else 'FAIL'}]"
            for t in table[-len(texts):]), flush=True)
    return table, ok


def _flips(s: dict) -> str:
    return ", ".join(f"@{f['pos']} gap {f['gap']:.3f}" for f in s["flips"]) or "-"


def markdown(table: list[dict]) -> str:
    md = ["| model | dtype | prompt | prompt tokens | tokens match | steps = argmax | flips "
          "(position, transformers' top-2 gap) | steps with err <= 0.001 | max logit err | bound "
          "| pass | vs F32: argmax, flips, err, pass |", "|---" * 12 + "|"]
    for t in table:
        s, f = t["score"], t["vs_f32"]
        md.append(f"| {t['model']} | {t['dtype']} | {t['prompt']} | {t['prompt_tokens']} | "
                  f"{'yes' if t['prompt_match'] else '**no**'} | {s['exact']}/{NEW_TOKENS} | "
                  f"{_flips(s)} | {s['same_steps']}/{NEW_TOKENS} | {s['max_err']:.4f} | "
                  f"{s['bound']:.3f} | {'yes' if t['passed'] else '**NO**'} | "
                  + (f"{f['exact']}/{NEW_TOKENS}, {len(f['flips'])}, {f['max_err']:.3f}, "
                     f"{'yes' if f['passed'] else 'no'} |" if t["dtype"] != "f32" else "= |"))
    return "\n".join(md)


def timing(rows: list[dict], model: str, texts: list[str], python: str) -> dict:
    """Decode tokens/s per prompt: llama.cpp on ``model``'s F32 and Q8_0 files, ftjax's
    generator on its HF export."""
    out: dict[str, Any] = {}
    prompt_ids = None
    for row in rows:
        if row["model"] == model and row["dtype"] in ("f32", "q8_0"):
            res = run_llamacpp(python, row["gguf"], texts, 3, timed=True)["results"]
            out[f"llama.cpp {row['dtype']} (n_threads=2)"] = [NEW_TOKENS / r["decode_s"]
                                                             for r in res]
            prompt_ids, hf = [r["prompt"] for r in res], row["hf"]
    if prompt_ids is None:
        sys.exit(f"error: --time_model={model}: no f32/q8_0 file of that model selected")
    out["ftjax generate f32 (XLA CPU)"] = [1 / s for s in ftjax_decode_s(hf, prompt_ids, 3)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ftjax-llamacpp")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--llamacpp_python", default="/work/llamacpp-venv/bin/python")
    ap.add_argument("--install", action="store_true", help=f"build {LLAMACPP} into the venv first")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated GGUF dtypes")
    ap.add_argument("--prepare", action="store_true", help="only train and export, then stop")
    ap.add_argument("--tamper", default="", choices=["", "swap", "rope", "eps"],
                    help="check a deliberately broken copy of each file (should FAIL)")
    ap.add_argument("--time", action="store_true", help="only time decoding (under cpu bench)")
    ap.add_argument("--time_model", default="smollm2-lora")
    ap.add_argument("--llamacpp_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp_worker:
        print(json.dumps(llamacpp_worker(json.loads(args.llamacpp_worker))))
        return 0
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        sys.exit(f"error: --dtypes={args.dtypes}: unknown {sorted(set(dtypes) - set(DTYPES))}; "
                 f"the check covers {', '.join(DTYPES)}")

    from ftjax.models.assets import smollm2_gguf_path
    from ftjax.models.gguf_io import load_tokenizer
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "smollm2_tokenizer"
    if not tok_dir.exists():
        load_tokenizer(smollm2_gguf_path()).save_pretrained(tok_dir)
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = prompt_texts(tokenizer)
    only = args.only.split(",") if args.only else None
    rows = []
    if only is None or "smollm2-lora" in only:
        rows += smollm2_run(root, args.steps, dtypes)
    rows += [r for r in tiny_models(root, tokenizer, dtypes) if only is None or r["model"] in only]
    if args.prepare:
        print(json.dumps(rows, indent=1))
        return 0
    if args.install:
        install_llamacpp(args.llamacpp_python)
    check_llamacpp_python(args.llamacpp_python)
    results = SCRIPT.parent / "results"
    results.mkdir(exist_ok=True)

    if args.time:
        tok_s = timing(rows, args.time_model, texts, args.llamacpp_python)
        md = [f"| {args.time_model}, greedy, {NEW_TOKENS} new tokens, batch 1 | decode tokens/s "
              "per prompt | median |", "|---|---|---|"]
        md += [f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} |"
               for k, v in tok_s.items()]
        print("\n".join(md))
        (results / "llamacpp_time.md").write_text("\n".join(md) + "\n")
        (results / "llamacpp_time.json").write_text(json.dumps(dict(
            machine=_common.machine(), model=args.time_model, texts=texts, tok_s=tok_s), indent=1))
        return 0

    tokenizer_ids = [tokenizer(t)["input_ids"] for t in texts]
    table, ok = check(rows, texts, tokenizer_ids, args.llamacpp_python, args.tamper)
    text = markdown(table)
    print(text)
    name = f"llamacpp-tampered-{args.tamper}" if args.tamper else "llamacpp"
    (results / f"{name}.md").write_text(text + "\n")
    (results / f"{name}.json").write_text(json.dumps(dict(
        machine=_common.machine(), passed=ok, logit_tol=LOGIT_TOL, texts=texts, rows=table),
        indent=1))
    print("PASS" if ok else "FAIL: see the table")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
