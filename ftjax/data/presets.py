"""Ready-made ``config.data`` settings for the data sets the project ships or tests with.

Configs call these instead of repeating paths, formats and label names.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

SST2_DIR = Path(__file__).resolve().parent / "assets" / "sst2"  # shipped: see its README
SST2_LABELS = dict(labels=["0", "1"], label_names=["negative", "positive"])
TREC_LABELS = dict(labels=["0", "1", "2", "3", "4", "5"],
                   label_names=["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"])


def sst2_files() -> dict:
    """The shipped SST-2 train split (6,920 sentences) and dev split (872, GLUE's dev sentences)."""
    return dict(train_path=str(SST2_DIR / "stsa.binary.train"),
                eval_path=str(SST2_DIR / "stsa.binary.dev"))


def sst2(data: ml_collections.ConfigDict, task: str = "classification") -> None:
    """SST-2 as ``classification``, ``lm`` (the sentences as text) or ``text_to_text``."""
    data.task = task
    data.format = "label_text"
    data.update(sst2_files())
    if task in ("classification", "text_to_text"):
        data.update(SST2_LABELS)
    if task == "text_to_text":
        data.prompt_template = "Review: {text}\nSentiment:"
        data.verbalizers = ["negative", "positive"]


def sst2_trec_mixture(data: ml_collections.ConfigDict, shared_data: str | Path) -> None:
    """Two classification tasks as a mixture: shipped SST-2 and TREC from ``shared_data``."""
    data.task = "classification"
    data.format = "label_text"
    trec = Path(shared_data) / "trec"
    data.mixture.tasks = {
        "sst2": dict(**sst2_files(), **SST2_LABELS),
        "trec": dict(train_path=str(trec / "TREC.train.all"), eval_path=str(trec / "TREC.test.all"),
                     encoding="iso-8859-1", **TREC_LABELS),
    }


# Train splits of the shared data sets as per-task overrides of ``config.data`` (mixture or
# meta-learning tasks); ``prompt_template`` / ``verbalizers`` serve task=text_to_text.

def trec_task(shared_data: str | Path) -> dict:
    """TREC question type (6 classes), train split (5,452 questions)."""
    return dict(train_path=str(Path(shared_data) / "trec" / "TREC.train.all"), format="label_text",
                encoding="iso-8859-1", **TREC_LABELS, prompt_template="Question: {text}\nType:",
                verbalizers=["description", "entity", "abbreviation", "person", "number", "location"])


def sms_spam_task(shared_data: str | Path) -> dict:
    """SMS Spam Collection (ham / spam), 5,574 messages, ``label<TAB>text``."""
    return dict(train_path=str(Path(shared_data) / "sms_spam" / "sms.tsv"), format="tsv", header="no",
                label_field="0", text_field="1", labels=["ham", "spam"], label_names=["ham", "spam"],
                prompt_template="Message: {text}\nSpam:", verbalizers=["no", "yes"])


def financial_phrasebank_task(shared_data: str | Path) -> dict:
    """Financial PhraseBank, all annotators agreeing (2,264 sentences; negative/neutral/positive)."""
    return dict(train_path=str(Path(shared_data) / "financial_phrasebank" / "fpb_Sentences_AllAgree.txt"),
                format="text_label", label_separator="@", labels=["negative", "neutral", "positive"],
                label_names=["negative", "neutral", "positive"],
                prompt_template="Sentence: {text}\nSentiment:", verbalizers=["negative", "neutral", "positive"])
