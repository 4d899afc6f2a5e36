"""Tokenizer metadata for a GGUF export, written as llama.cpp's own converter writes it.

A model that came from a GGUF file gets that file's ``tokenizer.*`` fields copied verbatim
(pre-tokenizer, tokens, types, merges, special ids, add-BOS/EOS flags, chat template). Otherwise
the byte-level BPE tokenizer is converted the way ``convert_hf_to_gguf.py`` does
(``get_vocab_base`` + ``_set_vocab_gpt2``): the pre-tokenizer is looked up by the hash of the
tokenizer's encoding of a probe text (``pretokenizers``), the token list is padded to the model's
vocabulary with ``[PADi]`` (UNUSED), and merges, special ids, add-BOS/EOS flags and the chat
template come from ``gguf.SpecialVocab`` over the saved tokenizer files and ``config.json``; an
add-BOS/EOS flag the files leave unset is written as the tokenizer behaves.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from ftjax.errors import FtjaxError
from ftjax.models.gguf_io.pretokenizers import PRE_OF_HASH, probe_hash


class GGUFTokenizerError(FtjaxError, ValueError):
    """A tokenizer that cannot be written to GGUF so that llama.cpp tokenizes like it."""


def pre_tokenizer_of(tokenizer: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for ``tokenizer``; an unknown one is an error."""
    digest = probe_hash(tokenizer)
    if digest not in PRE_OF_HASH:
        raise GGUFTokenizerError(
            f"llama.cpp does not know this tokenizer's pre-tokenizer (probe hash {digest}): a GGUF "
            f"with pre-tokenizer 'default' would split text differently than in training; pass "
            f"the llama.cpp name of an equivalent pre-tokenizer explicitly (--gguf_pre=NAME, one "
            f"of {sorted(set(PRE_OF_HASH.values()))}) or export --format=hf")
    return PRE_OF_HASH[digest]


def _looks_special(token: str) -> bool:
    """``TextModel.does_token_look_special`` of llama.cpp's converter."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokens_and_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """``get_vocab_base``: every id below ``vocab_size`` with its llama.cpp token type."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFTokenizerError(f"the tokenizer has ids up to {max(vocab.values())} but the "
                                 f"model's vocabulary is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_converted_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, hf_config: dict,
                            vocab_size: int, pre: str | None = None) -> str:
    """Write a byte-level BPE ``tokenizer`` (llama.cpp ``gpt2`` model); returns the pre name.
    ``pre`` overrides the hash lookup (for a tokenizer llama.cpp's table lacks)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise GGUFTokenizerError(
            f"only byte-level BPE tokenizers can be written to GGUF (this one is {model['type']}"
            f"{' with byte fallback, SentencePiece-style' if model.get('byte_fallback') else ''}); "
            f"export --format=hf and convert with llama.cpp's convert_hf_to_gguf.py")
    pre = pre or pre_tokenizer_of(tokenizer)
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "config.json").write_text(json.dumps(hf_config))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # Flags the files leave open are what the tokenizer does: add-BOS always written (llama.cpp's
    # default depends on the pre-tokenizer), add-EOS when set (llama.cpp's default is off).
    ids = tokenizer("a")["input_ids"]
    bos, eos = (special.special_token_ids.get(k) for k in ("bos", "eos"))
    special.add_special_token.setdefault("bos", bos is not None and ids[0] == bos)
    if eos is not None and ids[-1] == eos:
        special.add_special_token.setdefault("eos", True)
    special.add_to_gguf(writer, quiet=True)
    return pre


def _value(field: gguf.ReaderField) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def add_copied_tokenizer(writer: gguf.GGUFWriter, source: str | Path, tokenizer: Any,
                         vocab_size: int) -> str:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source``; returns its pre name.
    The source's vocabulary must be the model's and ``tokenizer``'s."""
    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
    vocab = tokenizer.get_vocab()
    if len(tokens) != vocab_size or any(tokens[i] != t for t, i in vocab.items() if i < len(tokens)):
        raise GGUFTokenizerError(
            f"the tokenizer of {source} ({len(tokens)} tokens) is not the exported model's "
            f"(vocabulary {vocab_size}, {len(vocab)} tokenizer entries); export with the "
            f"source GGUF's own tokenizer")
    for key, field in fields.items():
        writer.add_key_value(key, *_value(field))
    pre = fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else "default"
