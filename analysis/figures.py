"""The study's figures (seaborn), each written as a PNG with no timestamp so re-runs give the same bytes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PNG_META = {"Software": None}  # matplotlib would stamp its version; nothing time-dependent is written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=PNG_META)
    plt.close(fig)
    return path


def learning_curves(history: pd.DataFrame, path: Path, clip: float | None = 9.0) -> Path:
    """Train and validation bits/dim per epoch, one line per variant (mean over seeds), band = min-max
    over seeds (the seed report's Figure 1). history: one row per (run_id, epoch) with variant,
    train_bpd, val_bpd. Values above ``clip`` are drawn at the top edge (a diverging variant would
    flatten the rest). Aggregated here, not by seaborn, so 100 runs x 100 epochs draw in a second."""
    sns.set_theme(style="whitegrid", context="notebook")
    variants = sorted(history["variant"].unique())
    colors = dict(zip(variants, sns.color_palette("tab20", len(variants)), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, (key, title) in zip(axes, [("train_bpd", "train (train mode)"), ("val_bpd", "validation (eval mode)")],
                                strict=True):  # fmt: skip
        values = history[["variant", "epoch", key]].dropna()
        if clip is not None:
            values = values.assign(**{key: values[key].clip(upper=clip)})
        agg = values.groupby(["variant", "epoch"])[key].agg(["mean", "min", "max"]).reset_index()
        for variant, a in agg.groupby("variant", sort=True):
            ax.plot(a["epoch"], a["mean"], marker="o", markersize=3, color=colors[variant], label=variant)
            ax.fill_between(a["epoch"], a["min"], a["max"], color=colors[variant], alpha=0.15, lw=0)
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("bits/dim")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    note = f"; values above {clip:g} drawn at {clip:g}" if clip is not None else ""
    fig.suptitle(f"bits/dim per epoch: mean over seeds, band = min-max over seeds{note}")
    return _save(fig, path)


def effects(effect_table: pd.DataFrame, path: Path, baseline: str = "seed-report") -> Path:
    """Paired difference against ``baseline`` with its 95% bootstrap CI, one row per variant."""
    t = effect_table.dropna(subset=["mean_diff"]).sort_values("mean_diff")
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(t), 2) + 1.2))
    y = np.arange(len(t))
    lo = (t["mean_diff"] - t["ci_lo"]).fillna(0).clip(lower=0)
    hi = (t["ci_hi"] - t["mean_diff"]).fillna(0).clip(lower=0)
    ax.errorbar(t["mean_diff"], y, xerr=[lo, hi], fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(y, [f"{v} (n={n})" for v, n in zip(t["variant"], t["n_pairs"], strict=True)])
    ax.set_xlabel(f"test bits/dim minus {baseline}, same seed (right = worse)")
    ax.set_title("effect of each change, paired over seeds, 95% bootstrap CI")
    return _save(fig, path)


def gradient_traces(history: pd.DataFrame, path: Path, events: pd.DataFrame | None = None) -> Path:
    """Gradient norm (before clipping; mean and max per epoch) per variant on a log scale, the
    GradScaler scale where there is one, and the epochs of non-finite events as marks."""
    sns.set_theme(style="whitegrid", context="notebook")
    has_scale = history["grad_scale"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_scale else 1, figsize=(13 if has_scale else 7.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    mean_max = history.groupby(["variant", "epoch"], as_index=False)["grad_norm_max"].mean()
    sns.lineplot(data=mean_max, x="epoch", y="grad_norm_max", hue="variant", errorbar=None, ax=ax, legend=True)
    ax.set_yscale("log")
    ax.set_ylabel("max gradient norm per epoch, mean over seeds")
    if events is not None and len(events):
        for _, e in events.iterrows():
            ax.axvline(e["epoch"], color="red", lw=0.8, ls="--")
        ax.set_title("red dashes: epochs with a non-finite loss or gradient")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=8)
    if has_scale:
        scale = history.dropna(subset=["grad_scale"]).groupby(["variant", "epoch"], as_index=False)["grad_scale"].min()
        sns.lineplot(data=scale, x="epoch", y="grad_scale", hue="variant", errorbar=None, ax=axes[0, 1])
        axes[0, 1].set_yscale("log")
        axes[0, 1].set_ylabel("GradScaler scale (fp16)")
    return _save(fig, path)


def sample_panel(grids: dict[str, Path], path: Path) -> Path:
    """The final sample grid (temperature 0.7) of each variant side by side (the seed report's Figure 2)."""
    import matplotlib.image as mpimg

    names = sorted(grids)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        ax.imshow(mpimg.imread(grids[name]))
        ax.set_title(name, fontsize=10)
    return _save(fig, path)


def lr_search(trials: pd.DataFrame, path: Path) -> Path:
    """Validation bits/dim (last epoch reached) against learning rate for every search trial, log x;
    marker style = outcome (pruned trials stopped early, so their value is from an earlier epoch)."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    shown = trials.assign(val_bpd=trials["val_bpd"].clip(upper=9.0))
    sns.scatterplot(data=shown, x="lr", y="val_bpd", hue="variant", style="outcome", ax=ax, s=70)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation bits/dim (last epoch reached)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=8)
    return _save(fig, path)
