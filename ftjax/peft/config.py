"""The ``config.method`` section: which fine-tuning method, and every method's parameters."""

from __future__ import annotations

import ml_collections

from ftjax.peft import registry


def method_config() -> ml_collections.ConfigDict:
    """``kind`` (a registered method's name), the shared fields, and each method's own section
    (declared with the method, see ``ftjax.peft.registry``)."""
    return ml_collections.ConfigDict(dict(
        kind="full",  # one of ftjax.peft.METHODS
        seed=0,  # adapter initialisation
        # Also train the task head: auto = yes for classifiers, no for a pretrained LM head.
        train_head="auto",  # auto | true | false
        **registry.defaults(),
    ))
