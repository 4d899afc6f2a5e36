"""llama.cpp runs ftjax's GGUF exports exactly: prompt tokens and greedy continuations vs
transformers on the matching Hugging Face export (a check, outside the test suite).

    python benchmarks/check_llamacpp.py [--workdir=/tmp/ftjax-llamacpp] [--steps=4]
        [--llamacpp_python=/work/llamacpp-venv/bin/python] [--install] [--time] [--prepare]

``--install`` first creates that venv and builds ``llama-cpp-python==0.3.36`` from its sdist
into it (about 12 minutes of both cores on an idle machine; the build runs at ``nice 15``).
``--prepare`` only trains, exports and computes the transformers references (cached in
``--workdir``), so the llama.cpp part can run later.

Models: a short LoRA run of ``configs/smollm2_lm.py`` (``--steps``), exported with
``ftjax-export`` as ``--format=hf`` and as ``--format=gguf`` in F32 and Q8_0; and one tiny random
model of every other family llama.cpp runs (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3, GPT-2;
SmolLM2's tokenizer, unit-scale weights so greedy argmaxes are not near-ties), written by ftjax
both ways (``save_pretrained`` and ``save_gguf``). Prompts: contractions, numbers, whitespace
runs, non-ASCII, and one chat-templated prompt. For every file llama.cpp (``llama-cpp-python``,
run in ``--llamacpp_python``, which must have it installed) tokenizes each prompt (special tokens
parsed) and continues it greedily for 32 tokens with a plain argmax loop; transformers does the
same on the HF export. F32 files must match token for token (prompt and continuation); a Q8_0
file's continuation is compared with transformers on the HF export with its weights rounded
through the gguf package's Q8_0 (llama.cpp also rounds the activations to 8 bits in its Q8_0
matmuls, so a near-tie may still flip there), and with the F32 reference.

``--time`` (run it under ``/work/tools/cpu bench``) adds llama.cpp's decode tokens/s for the
SmolLM2 F32 and Q8_0 exports beside ftjax's own generator on the HF export (greedy, 32 new
tokens, batch 1, 2 threads, median of 3 per prompt). Results: ``benchmarks/results/llamacpp.json``
and the table printed (and ``.md``).
"""

from __future__ import annotations

import argparse
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
# Building the exports (ftjax) and the reference (transformers)
# ---------------------------------------------------------------------------------------------

def smollm2_run(root: Path, steps: int) -> list[dict]:
    """LoRA run of configs/smollm2_lm.py, exported as HF and as F32 / Q8_0 GGUF."""
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
    rows = []
    for fmt, dtype in (("hf", None), ("gguf", "f32"), ("gguf", "q8_0")):
        out = root / f"smollm2_{fmt}{'_' + dtype if dtype else ''}"
        if not out.exists():
            export_run(workdir, fmt, out, **({"gguf_dtype": dtype} if dtype else {}))
        if dtype:
            rows.append(dict(model="smollm2-lora", dtype=dtype, gguf=str(out / f"model-{dtype}.gguf"),
                             hf=str(root / "smollm2_hf")))
    return rows


def tiny_models(root: Path, tokenizer: Any) -> list[dict]:
    import transformers
    from ftjax.export import save_gguf
    from ftjax.models.loading import from_pretrained
    from ftjax.models.saving import save_pretrained
    from ftjax import sharding
    import jax
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    rows = []
    for name, config in tiny_configs().items():
        folder = root / f"tiny_{name}"
        src, hf = folder / "torch", folder / "hf"
        if not hf.exists():
            ref = _unit_scale(transformers.AutoModelForCausalLM.from_config(config))
            ref.save_pretrained(src)
            model, _ = from_pretrained(src, mesh=mesh)
            save_pretrained(model, hf, tokenizer)
            for dtype in ("f32", "q8_0"):
                save_gguf(model, tokenizer, folder / f"model-{dtype}.gguf", dtype)
        rows += [dict(model=f"tiny-{name}", dtype=d, gguf=str(folder / f"model-{d}.gguf"),
                      hf=str(hf)) for d in ("f32", "q8_0")]
    return rows


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _fake_q8_0(model: Any) -> None:
    """Round every weight llama.cpp's Q8_0 file holds quantised through the gguf package's
    Q8_0 (blocks of 32 along a GGUF row: GPT-2's Conv1D weights are transposed there)."""
    import gguf
    import numpy as np
    import torch
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or "wpe" in name:
                continue
            conv = name.endswith(_CONV1D)
            w = np.ascontiguousarray(p.numpy().T if conv else p.numpy())
            if w.shape[-1] % 32:
                continue
            back = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back.T if conv else back)))


def transformers_greedy(hf: str, texts: list[str], q8_0: bool = False) -> list[dict]:
    """Prompt ids (the HF export's tokenizer) and 32 greedy tokens (never stopping at EOS) of
    transformers on the HF export (``q8_0``: its weights rounded as the Q8_0 file holds them)."""
    import torch
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    if q8_0:
        _fake_q8_0(model)
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(NEW_TOKENS):  # plain argmax loop, as on the llama.cpp side
                nxt = model(input_ids=x).logits[0, -1].argmax()
                x = torch.cat([x, nxt.view(1, 1)], dim=1)
        out.append(dict(prompt=ids, continuation=x[0, len(ids):].tolist()))
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp (runs in --llamacpp_python) and ftjax's generator
# ---------------------------------------------------------------------------------------------

def llamacpp_worker(spec: dict) -> dict:
    """Tokenize and greedily continue every text with llama.cpp; decode time per prompt."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=spec["gguf"], n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    meta = {k: llm.metadata.get(k) for k in ("tokenizer.ggml.pre", "general.architecture")}
    out = []
    for text in spec["texts"]:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        runs, tokens = [], []
        for _ in range(spec["repeats"]):
            llm.reset()
            llm.eval(ids)
            tokens = []
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):  # the last position's logits, as llama.cpp returns them
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
                nxt = int(np.argmax(logits))
                tokens.append(nxt)
                llm.eval([nxt])
            runs.append(time.perf_counter() - start)
        out.append(dict(prompt=ids, continuation=tokens, decode_s=statistics.median(runs)))
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


def run_llamacpp(python: str, gguf: str, texts: list[str], repeats: int) -> dict:
    spec = json.dumps(dict(gguf=gguf, texts=texts, repeats=repeats))
    proc = subprocess.run([python, str(SCRIPT), "--llamacpp_worker", spec], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp worker failed on {gguf}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ftjax_decode_s(hf: str, prompt_ids: list[list[int]], repeats: int) -> list[float]:
    """ftjax's Generator (jitted KV-cache decode) on the HF export: seconds per 31 decode steps
    (the 32-token run minus the 1-token run: prefill and first token excluded)."""
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

def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ftjax-llamacpp")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--llamacpp_python", default="/work/llamacpp-venv/bin/python")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--install", action="store_true", help=f"build {LLAMACPP} into the venv first")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--prepare", action="store_true", help="only train and export, then stop")
    ap.add_argument("--llamacpp_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp_worker:
        print(json.dumps(llamacpp_worker(json.loads(args.llamacpp_worker))))
        return 0

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
    rows = smollm2_run(root, args.steps) + tiny_models(root, tokenizer)
    if args.only:
        rows = [r for r in rows if r["model"] in args.only.split(",")]
    def reference(row: dict, q8_0: bool) -> list[dict]:
        """transformers' tokens and continuations, cached in the workdir."""
        cache = root / f"reference-{row['model']}{'-q8_0' if q8_0 else ''}.json"
        if not cache.exists():
            cache.write_text(json.dumps(transformers_greedy(row["hf"], texts, q8_0=q8_0)))
        return json.loads(cache.read_text())

    for row in rows:
        reference(row, row["dtype"] == "q8_0")
    if args.prepare:
        print(json.dumps(rows, indent=1))
        return 0
    if args.install:
        install_llamacpp(args.llamacpp_python)
    check_llamacpp_python(args.llamacpp_python)

    table, ok = [], True
    for row in rows:
        ref = reference(row, False)
        cpp = run_llamacpp(args.llamacpp_python, row["gguf"], texts, 3 if args.time else 1)
        same_file = reference(row, True) if row["dtype"] == "q8_0" else ref
        for i, (r, c, s) in enumerate(zip(ref, cpp["results"], same_file)):
            prompt_ok = r["prompt"] == c["prompt"]
            cont = _agree(s["continuation"], c["continuation"])
            passed = prompt_ok and cont == NEW_TOKENS
            ok &= passed
            table.append(dict(model=row["model"], dtype=row["dtype"], prompt=i,
                              pre=cpp["meta"]["tokenizer.ggml.pre"], prompt_tokens=len(c["prompt"]),
                              prompt_match=prompt_ok, continuation_match=f"{cont}/{NEW_TOKENS}",
                              vs_f32_hf=f"{_agree(r['continuation'], c['continuation'])}/{NEW_TOKENS}",
                              llamacpp_decode_tok_s=NEW_TOKENS / c["decode_s"],
                              passed=passed, llamacpp=c, transformers=r))
        print(f"{row['model']:>16} {row['dtype']:>5}: " + " ".join(
            f"[{t['prompt_match'] and 'tok ok' or 'TOK DIFF'} {t['continuation_match']}]"
            for t in table[-len(texts):]), flush=True)

    timing = {}
    if args.time:
        hf = str(root / "smollm2_hf")
        ids = [t["transformers"]["prompt"] for t in table
               if t["model"] == "smollm2-lora" and t["dtype"] == "f32"]
        per_step = ftjax_decode_s(hf, ids, 3)
        timing["ftjax_decode_tok_s"] = [1 / s for s in per_step]
        for dtype in ("f32", "q8_0"):
            timing[f"llamacpp_{dtype}_decode_tok_s"] = [
                t["llamacpp_decode_tok_s"] for t in table
                if t["model"] == "smollm2-lora" and t["dtype"] == dtype]

    md = ["| model | dtype | pre | prompt | prompt tokens | tokens match | greedy 32 match | "
          "vs F32 HF |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {t['model']} | {t['dtype']} | {t['pre']} | {t['prompt']} | {t['prompt_tokens']} | "
           f"{'yes' if t['prompt_match'] else '**no**'} | {t['continuation_match']} | "
           f"{t['vs_f32_hf']} |" for t in table]
    if timing:
        md += ["", "| SmolLM2-135M LoRA export, greedy, batch 1 | decode tokens/s per prompt | "
               "median |", "|---|---|---|"]
        for k, v in timing.items():
            md.append(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} |")
    text = "\n".join(md)
    print(text)
    results = SCRIPT.parent / "results"
    results.mkdir(exist_ok=True)
    (results / "llamacpp.md").write_text(text + "\n")
    (results / "llamacpp.json").write_text(json.dumps(dict(
        machine=_common.machine(), passed=ok, timing=timing, texts=texts,
        rows=table), indent=1))
    print("PASS" if ok else "FAIL: see the table")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
