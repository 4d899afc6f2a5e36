"""The ``config.data`` section: where the data comes from and how it is prepared.

A split is read from ``train_path`` / ``eval_path`` (local files), from ``hf`` (a Hugging Face
``datasets`` hub id or local folder) or from ``tfds`` (a prepared TFDS directory). Everything
here but ``cache_dir`` is hashed into the key of the prepared-data cache (with the source files'
sizes and modification times), so the arms of a sweep, and reruns, prepare once.
"""

from __future__ import annotations

import ml_collections


def clean_config() -> ml_collections.ConfigDict:
    """Cleaning steps, applied in this order; every step is counted in the data report."""
    return ml_collections.ConfigDict(dict(
        nfkc=True,  # unicode NFKC normalisation
        control_chars=True,  # drop control / format characters (keeps \n and \t as spaces)
        whitespace=True,  # collapse runs of whitespace, strip the ends
        html_unescape=False,  # '&amp;' -> '&'
        lowercase=False,
        drop_empty=True,
        min_chars=0,  # 0 = no minimum
        max_chars=0,  # 0 = no maximum
        dedup=True,  # exact duplicates (same text, pair and label) within a split
        near_dedup=False,  # MinHash near-duplicates within a split
        near_dedup_threshold=0.9,  # estimated Jaccard similarity of word 3-gram shingles
        leakage="report",  # off | report | remove: eval rows whose text also occurs in train
    ))


def privacy_config() -> ml_collections.ConfigDict:
    """Personal data in the text (``ftjax.data.privacy``, presidio-analyzer's recognisers)."""
    return ml_collections.ConfigDict(dict(
        mode="off",  # off | redact ('<EMAIL>') | pseudonymise ('<EMAIL_3>') | quarantine (drop the row)
        entities=["email", "phone", "credit_card", "iban", "ip", "person"],
        min_score=0.4,  # presidio's confidence at or above which a finding counts
        ner_model="",  # spaCy pipeline (package name or folder) for person names; "" = not searched
        originals_path="",  # opt-in private JSONL of the values in clear, for the leakage check
    ))


def source_config() -> ml_collections.ConfigDict:
    """Where the rows come from and which fields hold what."""
    return ml_collections.ConfigDict(dict(
        # auto (by extension) | text | label_text | text_label | csv | tsv | jsonl | json |
        # parquet | conll | hf | tfds
        format="auto",
        encoding="",  # "" = UTF-8, with an error naming file, line and a suggested encoding
        header="auto",  # csv/tsv: auto | yes | no
        text_field="text",  # column / key of the text (index for header-less csv/tsv)
        text_pair_field="",  # second text for pair_classification
        label_field="label",
        messages_field="messages",  # chat: list of {role, content}
        response_field="",  # chat without messages: text_field is the user turn, this the reply
        # preference: text_field is the prompt ("" = chosen/rejected are whole conversations
        # sharing it); these hold the two responses (strings or chat message lists)
        chosen_field="chosen",
        rejected_field="rejected",
        label_separator="@",  # text_label files: 'TEXT@LABEL'
        conll_tag_column=-1,  # conll: column of the tag (token is column 0)
        hf=ml_collections.ConfigDict(dict(
            name="", config="", train_split="train", eval_split="validation", data_dir="")),
        tfds=ml_collections.ConfigDict(dict(
            name="", data_dir="", train_split="train", eval_split="test")),
    ))


def data_config() -> ml_collections.ConfigDict:
    c = source_config()
    c.update(dict(
        # lm | classification | pair_classification | token_classification | text_to_text | chat |
        # preference (pairs for DPO & co; ftjax.data.preference)
        task="lm",
        train_path="",  # local file of the train split
        eval_path="",  # local file of the eval split ("" = no eval, unless hf/tfds names one)
        seq_len=128,
        tokenizer="",  # HF tokenizer folder / hub id; empty = the model's own tokenizer
        tokenizer_file="",  # a .gguf file inside `tokenizer` to take the tokenizer from
        labels=[],  # declared label set (raw values as in the data); [] = sorted train labels
        label_names=[],  # display names, one per entry of `labels` ([] = the labels themselves)
        unknown_labels="error",  # error | quarantine: labels outside `labels`
        truncation="right",  # right (keep the start) | left (keep the end) | drop (quarantine)
        packing=True,  # lm / text_to_text / chat: pack examples into seq_len rows
        buckets=[],  # padded lengths for unpacked rows; [] = seq_len/4, seq_len/2, seq_len
        add_special_tokens=True,  # the tokenizer's BOS/CLS/SEP around each text
        prompt_template="{text}\nAnswer:",  # text_to_text: fields {text} and {text_pair}
        verbalizers=[],  # text_to_text: one answer string per label ([] = label names)
        system_prompt="",  # chat: prepended as a system turn when the data has none
        max_examples=0,  # keep the first N train rows after cleaning (0 = all)
        strict=False,  # warnings of the data report (e.g. a single-class train split) raise DataError
        # Prepared-data cache shared by runs and sweep arms ("" = $FTJAX_CACHE/data, by default
        # ~/.cache/ftjax/data; "none" = off; a folder or gs:// URL). Not part of the cache key.
        cache_dir="",
        clean=clean_config(),
        privacy=privacy_config(),
        # A nested train subset: the first round(fraction * rows) cleaned train rows of one
        # permutation seeded by `seed` alone (not train.seed), so 1/64 of the rows lie inside 1/32.
        subset=ml_collections.ConfigDict(dict(
            fraction=1.0,  # in (0, 1]; 1.0 = every row
            seed=0,
        )),
        kshot=ml_collections.ConfigDict(dict(
            k=0,  # k train examples per label, stratified (0 = all)
            draw=0,  # which independent draw (seeded by seed and draw)
            seed=0,
        )),
        mixture=ml_collections.ConfigDict(dict(
            tasks=ml_collections.ConfigDict(),  # name -> overrides of this section per task
            weighting="proportional",  # proportional | temperature | equal | explicit
            temperature=2.0,  # p_i ~ n_i ** (1 / T) for weighting=temperature
            weights=ml_collections.ConfigDict(),  # name -> weight for weighting=explicit
        )),
    ))
    return c
