"""GGUF tokenizer metadata against the SmolLM2 GGUF that llama.cpp's own converter wrote.

The reference is the real file's ``tokenizer.*`` fields (pre-tokenizer ``smollm``, 49152 tokens,
types, merges, special ids, add-BOS flag, chat template): converting its tokenizer must write the
same fields, and an export of a model that came from that file copies them.
"""

from __future__ import annotations

import gguf
import pytest

from ftjax.models.assets import smollm2_gguf_path
from ftjax.models.gguf_io import GGUFTokenizerError, load_tokenizer, pre_tokenizer_of, vocab
from test_gguf import tiny_bpe_tokenizer

VOCAB = 49152
CONFIG = {"bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def source():
    """The real file's tokenizer fields (read once: the reader is slow on 49152-entry arrays)."""
    return _tokenizer_fields(smollm2_gguf_path())


def _tokenizer_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _write_tokenizer(path, add) -> dict:
    writer = gguf.GGUFWriter(str(path), "llama")
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _tokenizer_fields(path)


def test_smollm2_pre_tokenizer_is_the_source_gguf_one(smollm2_tokenizer, source):
    assert source["tokenizer.ggml.pre"] == "smollm"
    assert pre_tokenizer_of(smollm2_tokenizer) == "smollm"


def test_converted_smollm2_tokenizer_equals_llamacpp_converter_output(smollm2_tokenizer, source,
                                                                     tmp_path):
    source = dict(source)
    written = _write_tokenizer(tmp_path / "t.gguf", lambda w: vocab.add_converted_tokenizer(
        w, smollm2_tokenizer, CONFIG, VOCAB))
    # add_space_prefix: the converter that wrote the source still emitted it for BPE vocabularies;
    # today's convert_hf_to_gguf.py does not (llama.cpp's BPE default is the same False).
    assert source.pop("tokenizer.ggml.add_space_prefix") is False
    assert set(written) == set(source)
    for key in sorted(source):
        assert written[key] == source[key], key


def test_copied_tokenizer_is_the_source_gguf_one(smollm2_tokenizer, source, tmp_path):
    written = _write_tokenizer(tmp_path / "t.gguf", lambda w: vocab.add_copied_tokenizer(
        w, smollm2_gguf_path(), smollm2_tokenizer, VOCAB))
    assert written == source


def test_copy_refuses_another_vocabulary(smollm2_tokenizer, tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    with pytest.raises(GGUFTokenizerError, match=r"is not the exported model's"):
        vocab.add_copied_tokenizer(writer, smollm2_gguf_path(), tiny_bpe_tokenizer(280), VOCAB)


def test_unknown_pre_tokenizer_is_an_error_unless_named(tmp_path):
    tokenizer = tiny_bpe_tokenizer(280)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    with pytest.raises(GGUFTokenizerError, match=r"probe hash [0-9a-f]{64}.*--gguf_pre=NAME"):
        vocab.add_converted_tokenizer(writer, tokenizer, {}, 280)
    written = _write_tokenizer(tmp_path / "u.gguf", lambda w: vocab.add_converted_tokenizer(
        w, tokenizer, {}, 300, pre="gpt-2"))
    assert written["tokenizer.ggml.pre"] == "gpt-2"
    assert written["tokenizer.ggml.tokens"][280:] == [f"[PAD{i}]" for i in range(280, 300)]
    assert set(written["tokenizer.ggml.token_type"][280:]) == {gguf.TokenType.UNUSED}
    assert written["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL] * 3
