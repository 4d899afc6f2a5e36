"""The ``config.preference`` section: which preference loss, its knobs, and the reference policy."""

from __future__ import annotations

import ml_collections


def preference_config() -> ml_collections.ConfigDict:
    """The ``config.preference`` section (used when ``data.task = "preference"``)."""
    return ml_collections.ConfigDict(dict(
        loss="dpo",  # dpo | robust | ipo | simpo | orpo | kto
        beta=0.1,  # strength of the KL pull (dpo/ipo/kto), temperature (simpo), OR weight (orpo)
        label_smoothing=0.0,  # dpo: conservative DPO; robust: flip rate in [0, 0.5); simpo too
        simpo_gamma=0.5,  # simpo: target reward margin gamma (TRL's simpo_gamma)
        sft_weight=0.0,  # simpo: weight of the chosen-response NLL (TRL's cpo_alpha)
        desirable_weight=1.0,  # kto
        undesirable_weight=1.0,  # kto
        # Reference policy: auto (adapter methods: the backbone with adapters switched off; full
        # fine-tuning: copy) | adapter_off | copy (a frozen copy of the starting weights) |
        # precomputed (reference log-probs computed once per example, cached beside the data).
        reference="auto",
    ))
