"""The ``config.method`` section: which fine-tuning method, and every method's parameters."""

from __future__ import annotations

import ml_collections

# Linear layers by module-path regex, for the model families' own names
# (Llama/Gemma: q_proj.., BERT/RoBERTa: attention/self/query.., GPT-2: c_attn..).
LORA_TARGETS = r"(q_proj|v_proj|self/query|self/value|attn/c_attn)$"
IA3_TARGETS = r"(k_proj|v_proj|down_proj|self/key|self/value|layer/output/dense|attn/c_attn|mlp/c_proj)$"
IA3_FEEDFORWARD = r"(down_proj|layer/output/dense|mlp/c_proj)$"


def method_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # full | head | partial | gradual | llrd | lora | dora | qlora | houlsby | pfeiffer |
        # ia3 | prefix | prompt | bitfit
        kind="full",
        seed=0,  # adapter initialisation
        # Also train the task head: auto = yes for classifiers, no for a pretrained LM head.
        train_head="auto",  # auto | true | false
        partial=dict(top_blocks=2, patterns=""),  # patterns: comma-separated regexes over paths
        gradual=dict(start_blocks=1, every_steps=50),  # top blocks first, one more every K steps
        llrd=dict(decay=0.8),  # block i of L trains at lr * decay ** (L - i)
        lora=dict(rank=8, alpha=16.0, targets=LORA_TARGETS, rslora=False),  # dora/qlora too
        qlora=dict(quant="nf4", block_size=64),  # nf4 | int8; blocks along the input axis
        adapter=dict(size=0, reduction_factor=16, activation="relu",  # size 0: D / factor
                     targets=""),  # "" = the variant's placement (houlsby / pfeiffer)
        ia3=dict(targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD),
        prompt=dict(num_virtual_tokens=20, init_text=""),  # "" = random vocabulary rows
        prefix=dict(num_virtual_tokens=20, projection=0),  # projection > 0: MLP hidden size
    ))
