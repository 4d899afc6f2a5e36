"""Which sweep arms fuse: their configs agree outside the traced keys (no jax needed).

The sweep runner groups arms with this before starting any process; ``ftjax.train.fused``
builds and trains a group.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Hashable, Sequence, TypeVar

import ml_collections

from ftjax.errors import FtjaxError

# Config keys whose values are traced (or only change the init and the data order): arms that
# differ only in these fuse. Every other key must be equal across a group.
FUSABLE = ("train.learning_rate", "train.weight_decay", "train.b1", "train.b2", "train.eps",
           "train.seed", "method.lora.alpha", "method.lora.rank", "method.lora.dropout")
T = TypeVar("T")


class FuseFlagError(FtjaxError, ValueError):
    """A --fuse value that is not auto, off or max_arms=N."""


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def program_key(config: ml_collections.ConfigDict) -> str | None:
    """A string equal for arms that fuse (their configs agree outside ``FUSABLE``), or None for
    an arm that never fuses (a regulariser anchored at the arm's own start; W&B logging, which
    keeps one W&B run per process)."""
    if config.regularizer.kind != "none" and config.regularizer.strength:
        return None
    if config.log.wandb:
        return None
    flat = _flat(config.to_dict())
    fusable = FUSABLE
    init = str(config.method.lora.init)
    if init == "olora" or init.startswith("pissa"):  # lora_init.moves_base: the frozen A0, B0
        fusable = tuple(k for k in FUSABLE if k != "method.lora.rank")  # have the arm's rank
    key = {k: v for k, v in flat.items() if k not in fusable}
    key["lora dropout on"] = bool(config.method.lora.dropout)  # rate 0 has no dropout in its graph
    return json.dumps(key, sort_keys=True, default=str)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted ``overrides`` (a sweep arm's) applied."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def parse_fuse(value: str) -> int | None:
    """``--fuse``: 'off' -> None, 'auto' -> 0 (as many as the memory estimate fits),
    'max_arms=N' -> N."""
    if value == "off":
        return None
    if value == "auto":
        return 0
    key, _, n = value.partition("=")
    if key == "max_arms" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise FuseFlagError(f"--fuse={value!r}: use auto, off or max_arms=N (N >= 1)")


def group_by_program(items: Sequence[T], key: Callable[[T], Hashable | None],
                     max_arms: int = 0) -> list[list[T]]:
    """Items with equal ``key`` together (first-seen order), in chunks of at most ``max_arms``
    (0: no limit); a None key stays alone."""
    groups: dict[Any, list[T]] = {}
    for i, item in enumerate(items):
        k = key(item)
        groups.setdefault(("alone", i) if k is None else k, []).append(item)
    out = []
    for members in groups.values():
        step = max_arms or len(members)
        out += [members[i:i + step] for i in range(0, len(members), step)]
    return out
