"""The GGUF tokenizer cache (``gguf_io.load_tokenizer``): the rebuilt tokenizer, saved once and
read back, encodes and chat-templates exactly as transformers' own GGUF rebuild does."""

import os

import pytest

PROBE = ("it's a charming and often affecting journey. I'd've said 12,345.67 — naïve café 東京 🙂\n\n"
         "  tabs\tand   runs of spaces   ")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Isn't it?"}]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path))
    return tmp_path / "tokenizers"


def test_cached_tokenizer_equals_transformers_gguf_rebuild(cache):
    import transformers
    from ftjax.models.assets import smollm2_gguf_path
    from ftjax.models.gguf_io import load_tokenizer
    path = smollm2_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    first = load_tokenizer(path)  # rebuilt and saved
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    second = load_tokenizer(path)  # read from the folder
    assert os.path.samefile(second.name_or_path, folder)
    for tok in (first, second):
        assert tok(PROBE)["input_ids"] == reference(PROBE)["input_ids"]
        assert tok.decode(reference(PROBE)["input_ids"]) == reference.decode(reference(PROBE)["input_ids"])
        assert (tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
                == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (
            reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, len(reference))


def test_a_half_written_cache_folder_is_rebuilt(cache):
    from ftjax.models.assets import smollm2_gguf_path
    from ftjax.models.gguf_io import load_tokenizer
    path = smollm2_gguf_path()
    load_tokenizer(path)
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    (folder / "ftjax-gguf-source.txt").unlink()  # as if the writer died before finishing
    (folder / "tokenizer.json").write_text("{")  # and left a broken file
    tok = load_tokenizer(path)  # not read from the broken folder: rebuilt, and the folder replaced
    assert not os.path.samefile(tok.name_or_path, folder)
    assert (folder / "ftjax-gguf-source.txt").exists()
    assert load_tokenizer(path)("it's")["input_ids"] == tok("it's")["input_ids"]
