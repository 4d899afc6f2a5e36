"""The controlled-sentiment experiment's report: a table per arm group and the reward-KL plot.

Per group (loss x method) over its seeds: the mean classifier reward on the held-out prompts
(mean ± std over seeds), the sequence KL to the SFT policy (same), and the win rate against the
SFT policy's completions on the same prompts, pooled over seeds and prompts, with a 95% Wilson
interval (ties count half).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from etils import epath

from ftjax.eval.plots import save_figure
from ftjax.preference import policy_eval

COLUMNS = ("name", "group", "mean_reward", "kl", "win_rate", "n")


def rows(arms: list[dict], results: dict[str, dict], baseline: str = "sft") -> list[dict[str, Any]]:
    """One row per arm: mean reward, KL to the SFT policy, win rate against its completions."""
    base = results[baseline]["reward"]
    out = []
    for arm in arms:
        r = results[arm["name"]]
        win, n = policy_eval.win_rate(r["reward"], base)
        out.append(dict(name=arm["name"], group=arm["group"], mean_reward=r["mean_reward"], kl=r["kl"],
                        win_rate=win, n=n))
    return out


def groups(arm_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group: seeds, reward and KL mean/std over seeds, pooled win rate and its Wilson CI."""
    out = []
    for g in dict.fromkeys(r["group"] for r in arm_rows):
        rs = [r for r in arm_rows if r["group"] == g]
        n = sum(r["n"] for r in rs)
        win = sum(r["win_rate"] * r["n"] for r in rs) / n
        reward, kl = np.array([r["mean_reward"] for r in rs]), np.array([r["kl"] for r in rs])
        sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0
        out.append(dict(group=g, seeds=len(rs), reward=float(reward.mean()), reward_std=sd(reward),
                        kl=float(kl.mean()), kl_std=sd(kl), win_rate=win,
                        win_ci=policy_eval.wilson_interval(win, n), n=n))
    return out


def markdown(group_rows: list[dict[str, Any]], sft_reward: float, n_prompts: int) -> str:
    lines = ["| policy | seeds | mean reward (± std over seeds) | KL to SFT, nats (± std) | "
             "win rate vs SFT [95% Wilson CI] | comparisons |", "|---|---|---|---|---|---|",
             f"| SFT | - | {sft_reward:.3f} | 0 | - | {n_prompts} prompts |"]
    for g in sorted(group_rows, key=lambda x: -x["reward"]):
        lo, hi = g["win_ci"]
        lines.append(f"| {g['group']} | {g['seeds']} | {g['reward']:.3f} ± {g['reward_std']:.3f} | "
                     f"{g['kl']:.2f} ± {g['kl_std']:.2f} | {g['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {g['n']} |")
    return "\n".join(lines) + "\n"


def plot(path: epath.Path, arm_rows: list[dict[str, Any]], sft_reward: float) -> None:
    """The reward-KL frontier: one point per arm (colour: loss, marker: method), SFT at KL 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(r["group"].split("-")[0] for r in arm_rows))
    markers = {"lora": "o", "full": "s"}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter([0.0], [sft_reward], marker="*", s=160, color="black", label="SFT", zorder=3)
    for g in dict.fromkeys(r["group"] for r in arm_rows):
        rs = [r for r in arm_rows if r["group"] == g]
        loss, _, method = g.partition("-")
        ax.scatter([r["kl"] for r in rs], [r["mean_reward"] for r in rs], color=f"C{losses.index(loss)}",
                   marker=markers.get(method, "^"), s=45, label=g, alpha=0.85)
    ax.set_xlabel("sequence KL to the SFT policy (nats, sampled)")
    ax.set_ylabel("mean reward, P(positive)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write(workdir: epath.Path, arms: list[dict], results: dict[str, dict], timings: dict[str, float]) -> dict:
    """results.csv, report.md and reward_kl.png in ``workdir``; returns the table's rows."""
    arm_rows = rows(arms, results)
    group_rows = groups(arm_rows)
    sft_reward, n_prompts = results["sft"]["mean_reward"], len(results["sft"]["reward"])
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(arm_rows)
    (workdir / "results.csv").write_text(out.getvalue())
    plot(workdir / "reward_kl.png", arm_rows, sft_reward)
    text = ["# Controlled sentiment generation (DPO paper, sec. 6.1)", "",
            f"{n_prompts} held-out prompts, one sampled completion each per policy; reward = the "
            "classifier's P(positive); KL = mean over those samples of log pi(y|x) - log pi_sft(y|x).", "",
            markdown(group_rows, sft_reward, n_prompts), "![reward vs KL](reward_kl.png)", "",
            f"Wall time of the stages run: {sum(timings.values()) / 60:.1f} min "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})."]
    (workdir / "report.md").write_text("\n".join(text) + "\n")
    return dict(sft_reward=sft_reward, groups=group_rows, arms=arm_rows)
