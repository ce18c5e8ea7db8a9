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


def off_scale(history: pd.DataFrame, limit: float = 8.5) -> list[str]:
    """Variants with a non-finite value or a validation mean above ``limit`` bits/dim (worse than the
    uniform density's 8) in some epoch: drawn apart, so they do not flatten the others."""
    values = history.assign(val_bpd=history["val_bpd"].astype(float))
    mean = values.groupby(["variant", "epoch"])["val_bpd"].mean()
    bad = set(mean[~np.isfinite(mean) | (mean > limit)].index.get_level_values(0))
    return sorted(bad | set(values.loc[~np.isfinite(values["val_bpd"]), "variant"]))


def learning_curves(history: pd.DataFrame, path: Path) -> Path:
    """Train and validation bits/dim per epoch, one line per variant (mean over seeds), band = min-max
    over seeds (the seed report's Figure 1). history: one row per (run_id, epoch) with variant,
    train_bpd, val_bpd. Off-scale variants (:func:`off_scale`) get their own row with a log axis.
    Aggregated here, not by seaborn, so 100 runs x 100 epochs draw in a second."""
    sns.set_theme(style="whitegrid", context="notebook")
    apart = off_scale(history)
    groups = [("in range", history[~history["variant"].isin(apart)])]
    if apart:
        groups.append(("off scale, log axis", history[history["variant"].isin(apart)]))
    variants = sorted(history["variant"].unique())
    colors = dict(zip(variants, sns.color_palette("tab20", len(variants)) * 2, strict=False))
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.4 * len(groups)), squeeze=False)
    panels = [("train_bpd", "train (train mode)"), ("val_bpd", "validation (eval mode, fp32)")]
    for row, (label, h) in enumerate(groups):
        for ax, (key, title) in zip(axes[row], panels, strict=True):
            values = h[["variant", "epoch", key]].replace([np.inf, -np.inf], np.nan).dropna()
            agg = values.groupby(["variant", "epoch"])[key].agg(["mean", "min", "max"]).reset_index()
            for variant, a in agg.groupby("variant", sort=True):
                ax.plot(a["epoch"], a["mean"], marker="o", markersize=3, color=colors[variant], label=variant)
                ax.fill_between(a["epoch"], a["min"], a["max"], color=colors[variant], alpha=0.15, lw=0)
            ax.set_title(f"{title}: {label}")
            ax.set_xlabel("epoch")
            if row == 1:
                ax.set_yscale("log")
        axes[row, 0].set_ylabel("bits/dim")
        axes[row, 1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=7)
    fig.suptitle("bits/dim per epoch: mean over seeds, band = min-max over seeds (non-finite epochs left out)")
    return _save(fig, path)


FADED = ("did not act", "fails to train")


def family_effects(comparisons: pd.DataFrame, path: Path) -> Path:
    """One panel per family: each member's paired difference on test bits/dim against its comparator
    with the 95% t interval over seeds (right = worse). A panel whose intervals span more than 1
    bits/dim uses a symmetric log axis, so small effects stay readable beside a large one."""
    sns.set_theme(style="whitegrid", context="notebook")
    fams = list(dict.fromkeys(comparisons["family"]))
    heights = [max(2, int((comparisons["family"] == f).sum())) * 0.42 + 0.9 for f in fams]
    fig, axes = plt.subplots(len(fams), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, fam in zip(axes[:, 0], fams, strict=True):
        t = comparisons[comparisons["family"] == fam].reset_index(drop=True)
        for i, r in t.iterrows():
            faded = r["verdict"] in FADED
            x = r["mean_diff"] if np.isfinite(r["mean_diff"]) else 0.0
            err = [[max(x - r["ci_lo"], 0) if np.isfinite(r["ci_lo"]) else 0],
                   [max(r["ci_hi"] - x, 0) if np.isfinite(r["ci_hi"]) else 0]]  # fmt: skip
            color = "tab:gray" if faded else "tab:red" if r["verdict"].startswith("detectable") else "tab:blue"
            ax.errorbar(x, i, xerr=err, fmt="x" if faded else "o", color=color, capsize=3)
        labels = [f"{r['variant']} vs {r['against']} (n={r['n_pairs']})"
                  + (f" [{r['verdict']}]" if r["verdict"] in FADED else "") for _, r in t.iterrows()]  # fmt: skip
        ax.set_yticks(range(len(t)), labels, fontsize=8)
        ax.axvline(0, color="black", lw=1)
        span = np.nanmax(np.abs(np.r_[t["ci_lo"], t["ci_hi"], t["mean_diff"]].astype(float))) if len(t) else 0.0
        if np.isfinite(span) and span > 1:
            ax.set_xscale("symlog", linthresh=0.05)
        ax.set_title(f"{fam}: red = detectable after Holm, grey x = did not act or fails to train", fontsize=9)
    axes[-1, 0].set_xlabel("test bits/dim minus comparator, same seed (right = worse), 95% t interval")
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


def half_normal(effects: pd.DataFrame, path: Path) -> Path:
    """Daniel's half-normal plot: |effect| of every main effect and interaction against half-normal
    quantiles; effects on the line through the small ones are noise, those far above it are not. Red:
    Holm-significant. effects: one row per term with term, effect, p_holm."""
    from scipy.stats import norm

    sns.set_theme(style="whitegrid", context="notebook")
    t = effects.assign(size=effects["effect"].abs()).sort_values("size").reset_index(drop=True)
    m = len(t)
    q = norm.ppf(0.5 + 0.5 * (np.arange(1, m + 1) - 0.5) / m)
    fig, ax = plt.subplots(figsize=(7, 5))
    sig = (t["p_holm"] <= 0.05).to_numpy()
    ax.scatter(q[~sig], t["size"][~sig], color="tab:blue")
    ax.scatter(q[sig], t["size"][sig], color="tab:red")
    for x, (_, r) in zip(q, t.iterrows(), strict=True):
        if r["size"] >= t["size"].median():
            ax.annotate(r["term"], (x, r["size"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("half-normal quantile")
    ax.set_ylabel("|effect| on test bits/dim (high - low)")
    ax.set_title("half-normal plot of effects (red: Holm-significant)")
    return _save(fig, path)


def interaction_plots(data: pd.DataFrame, pairs: list[tuple[str, str]], path: Path, value: str = "test_bpd") -> Path:
    """For each pair (a, b) of coded factor columns: mean ``value`` at a = -1/+1, one line per level of
    b; parallel lines mean no interaction. data: runs that trained, with -1/+1 factor columns."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        means = data.groupby([a, b])[value].mean().reset_index()
        for level, g in means.groupby(b):
            ax.plot(g[a], g[value], marker="o", label=f"{b.replace('_', '-')} {'on' if level > 0 else 'off'}")
        ax.set_xticks([-1, 1], ["off", "on"])
        ax.set_xlabel(a.replace("_", "-"))
        ax.set_ylabel(f"mean {value}")
        ax.legend(fontsize=8)
    fig.suptitle("interactions among runs that trained (parallel lines: no interaction)")
    return _save(fig, path)


def long_run(history: pd.DataFrame, path: Path, window: int = 40) -> Path:
    """The seed report's Figure 1 for each recipe: train and validation bits/dim over the epochs, one
    panel per variant, every seed drawn (validation solid, train dashed, one colour per seed), the last
    ``window`` epochs shaded (the window its Table 2 averages). history: one row per (run_id, epoch)
    with variant, seed, train_bpd, val_bpd. Non-finite epochs are left out of the lines."""
    sns.set_theme(style="whitegrid", context="notebook")
    variants = sorted(history["variant"].unique())
    seeds = sorted(history["seed"].unique())
    colors = dict(zip(seeds, sns.color_palette("deep", len(seeds)), strict=True))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.2), squeeze=False, sharey=True)
    values = history[["train_bpd", "val_bpd"]].replace([np.inf, -np.inf], np.nan)
    settled = values[history["epoch"] >= 3].stack()
    top = float(settled.quantile(0.99)) if len(settled) else 8.0
    bottom = float(settled.min()) if len(settled) else 0.0
    for ax, variant in zip(axes[0], variants, strict=True):
        h = history[history["variant"] == variant]
        last = int(h["epoch"].max()) if len(h) else 0
        if last >= window:
            ax.axvspan(last - window + 0.5, last + 0.5, color="0.85", alpha=0.6, lw=0,
                       label=f"epochs {last - window + 1}-{last}")  # fmt: skip
        for seed, r in h.groupby("seed", sort=True):
            r = r.sort_values("epoch").replace([np.inf, -np.inf], np.nan)
            ax.plot(r["epoch"], r["val_bpd"], color=colors[seed], lw=1.2, label=f"seed {seed} validation")
            ax.plot(r["epoch"], r["train_bpd"], color=colors[seed], lw=1.0, ls="--", alpha=0.8,
                    label=f"seed {seed} train")  # fmt: skip
        ax.set_title(variant)
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom - 0.05, top + 0.05)
    axes[0, 0].set_ylabel("bits/dim")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=7)
    fig.suptitle(f"train (dashed, train mode) and validation (solid, eval mode) bits/dim; shaded: the last {window} "
                 "epochs")  # fmt: skip
    return _save(fig, path)


def _recipe_colors(recipes) -> dict[str, tuple]:
    return dict(zip(recipes, sns.color_palette("tab10", len(recipes)), strict=True))


def ladder_curves(curves: pd.DataFrame, path: Path, cap: float = 8.0) -> Path:
    """Wortsman et al.'s Figure 1 for the ladder: final validation bits/dim against the learning rate (log
    x), one panel per rung, one line per recipe through the mean over the seeds that trained, a dot per
    seed. A run that did not train is an x at ``cap`` (the uniform density's 8 bits/dim, where LR
    sensitivity scores it), so a failure is drawn, never dropped; a trained value above the cap is drawn
    at the cap too. curves: analysis.transfer.lr_curves (rung, recipe, lr, seed, val_bpd, failed)."""
    sns.set_theme(style="whitegrid", context="notebook")
    rungs = list(dict.fromkeys(curves["rung"]))
    recipes = list(dict.fromkeys(curves.sort_values("recipe")["recipe"]))
    colors = _recipe_colors(recipes)
    fig, axes = plt.subplots(1, len(rungs), figsize=(4.6 * len(rungs), 4.4), sharey=True, squeeze=False)
    offsets = dict(zip(recipes, np.linspace(-0.06, 0.06, len(recipes)), strict=True))  # in log10(lr): no overlap
    for ax, rung in zip(axes[0], rungs, strict=True):
        for recipe in recipes:
            c = curves[(curves["rung"] == rung) & (curves["recipe"] == recipe)]
            x = c["lr"] * 10 ** offsets[recipe]
            ok = c[~c["failed"]]
            mean = ok.groupby("lr")["val_bpd"].mean().clip(upper=cap)
            ax.plot(mean.index * 10 ** offsets[recipe], mean.to_numpy(), color=colors[recipe], label=recipe, lw=1.6)
            ax.scatter(x[~c["failed"]], c.loc[~c["failed"], "val_bpd"].clip(upper=cap), color=colors[recipe], s=18)
            ax.scatter(x[c["failed"]], np.full(int(c["failed"].sum()), cap), color=colors[recipe], marker="x", s=45)
        ax.set_xscale("log")
        ax.set_title(f"{rung} (maps x blocks)")
        ax.set_xlabel("learning rate")
        ax.axhline(cap, color="0.5", lw=0.8, ls=":")
    axes[0, 0].set_ylabel(f"final validation bits/dim (x: did not train, drawn at {cap:g})")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    fig.suptitle("learning rate against bits/dim per model size: line = mean over seeds that trained, dot = a seed")
    return _save(fig, path)


def ladder_sensitivity(per_seed: pd.DataFrame, summary: pd.DataFrame, weights: dict[str, int], path: Path) -> Path:
    """LR sensitivity against the model's weights (log x), one line per recipe: the mean over seeds with its
    95% t interval as a bar, a dot per seed. per_seed: analysis.transfer.lr_sensitivity; summary:
    analysis.transfer.over_seeds of it; weights: rung -> parameter count."""
    sns.set_theme(style="whitegrid", context="notebook")
    recipes = list(dict.fromkeys(summary.sort_values("recipe")["recipe"]))
    colors = _recipe_colors(recipes)
    offsets = dict(zip(recipes, np.linspace(0.97, 1.03, len(recipes)), strict=True))
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for recipe in recipes:
        s = summary[summary["recipe"] == recipe]
        x = np.array([weights[r] for r in s["rung"]], dtype=float) * offsets[recipe]
        lo, hi = s["ci_lo"].to_numpy(dtype=float), s["ci_hi"].to_numpy(dtype=float)
        mean = s["mean"].to_numpy(dtype=float)
        err = np.vstack([mean - lo, hi - mean])
        ax.errorbar(x, mean, yerr=np.where(np.isfinite(err), err, 0), color=colors[recipe], label=recipe, marker="o",
                    capsize=3, lw=1.4)  # fmt: skip
        p = per_seed[per_seed["recipe"] == recipe]
        ax.scatter(np.array([weights[r] for r in p["rung"]], dtype=float) * offsets[recipe], p["sensitivity"],
                   color=colors[recipe], s=12, alpha=0.6)  # fmt: skip
    if np.isfinite(per_seed["sensitivity"].to_numpy(dtype=float)).any():
        ax.set_xscale("log")
    else:  # no seed trained at any learning rate of any rung: nothing to measure from, and said so
        ax.text(0.5, 0.5, "no run trained: LR sensitivity is undefined", ha="center", transform=ax.transAxes)
    ax.set_xlabel("model weights (parameters)")
    ax.set_ylabel("LR sensitivity (bits/dim)")
    ax.set_title("LR sensitivity against size: mean over seeds, 95% t interval (1 df at 2 seeds), dot = a seed")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    return _save(fig, path)
