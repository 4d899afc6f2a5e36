"""The ``config.data`` section: where the data comes from and how it is prepared."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        task="lm",  # lm | classification | pair_classification | token_classification | text_to_text | chat
        train_path="",  # file read as plain text lines for the lm task
        eval_path="",
        seq_len=128,
        tokenizer="",  # HF tokenizer folder / hub id; empty = the model's own tokenizer
    ))
