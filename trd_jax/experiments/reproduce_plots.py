"""The reproduction's plots (trd_jax.experiments.reproduce): accuracy against step, generated tokens and FLOPs;
Pass@k of the final students; the prefix-failure diagnostics per step. Drawing only: reproduce gathers the data."""

from __future__ import annotations

import os

import numpy as np


def draw(out: str, results: dict, diagnostics: dict, *, reference: str, diagnostic_keys: tuple[str, ...]) -> list[str]:
    """accuracy.png: held-out Avg@n and the training rollouts' accuracy against step, cumulative generated
    tokens and cumulative FLOPs (mean over a method's runs on results["curves_bootstrap"]); pass_at_k.png: Pass@k
    of the final students against k (log2 axis); diagnostics.png: diagnostics[(setting, method)], per run and
    step the values of diagnostic_keys, averaged over runs. The reference method's lines are drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(key.split("/")[0] for key in results["curves"]))
    paths = []
    # Rows per setting: held-out Avg@n (markers: the evaluations, step 0 shared), then the accuracy of the
    # student's training rollouts (a moving mean over 5 steps), each against step, tokens and FLOPs.
    fig, axes = plt.subplots(2 * len(settings), 3, figsize=(16, 7.6 * len(settings)), squeeze=False)
    cmap = plt.get_cmap("tab20")  # 14+ methods: ten default colours would repeat
    colors = {m: cmap(i % 20) for i, m in enumerate(dict.fromkeys(k.split("/", 1)[1] for k in results["curves"]))}
    xs = ("step", "generated_tokens", "flops")
    for row, setting in enumerate(settings):
        for key, curves in results["curves"].items():
            st, method = key.split("/", 1)
            length = min(len(c) for c in curves)
            if st != setting or not length:
                continue
            style = {"label": method, "color": colors[method], "lw": 2.5 if method == reference else 1.2}
            mean = {f: np.mean([[p[f] for p in c[:length]] for c in curves], axis=0) for f in ("avg_at_k", *xs)}
            train = results.get("train_curves", {}).get(key) or []
            for col, x in enumerate(xs):
                axes[2 * row][col].plot(mean[x], 100 * mean["avg_at_k"], marker="o", **style)
                if len(train) >= 5:
                    acc = np.convolve([p["accuracy_y_o"] for p in train], np.ones(5) / 5, mode="valid")
                    axes[2 * row + 1][col].plot([p[x] for p in train][4:], 100 * acc, **style)
        for col, label in enumerate(("step", "cumulative generated tokens", "cumulative FLOPs (estimated)")):
            for r, (title, ylabel) in enumerate((("held-out accuracy", "Avg@n (%)"),
                                                 ("accuracy of training rollouts y_o", "moving mean of 5 steps (%)"))):
                ax = axes[2 * row + r][col]
                ax.set(title=f"{setting.upper()}: {title} (bootstrap {results.get('curves_bootstrap', 0)})",
                       xlabel=label, ylabel=ylabel)
                ax.grid(alpha=0.3)
        axes[2 * row][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "accuracy.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for key, pass_at in results["pass_at_k_final"].items():
            st, method = key.split("/", 1)
            if st == setting:
                ks = [int(k) for k in pass_at]
                ax.plot(ks, [100 * v for v in pass_at.values()], marker="o", label=method,
                        lw=2.5 if method == reference else 1.2)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{setting.upper()}: final students", xlabel="k", ylabel="Pass@k (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "pass_at_k.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    keys = diagnostic_keys
    fig, axes = plt.subplots(len(settings), len(keys), figsize=(4.2 * len(keys), 3.4 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            for (st, method), runs in diagnostics.items():
                if st != setting:
                    continue
                series = [[step[col] for step in run] for run in runs]
                length = min(map(len, series))
                values = np.array([x[:length] for x in series], np.float64).reshape(len(series), length)
                logged = ~np.isnan(values).all(axis=0)  # log.diagnostics_every > 1 leaves steps out
                if logged.any():
                    ax.plot(np.arange(1, length + 1)[logged], np.nanmean(values[:, logged], axis=0),
                            label=method, lw=2.5 if method == reference else 1.2)
            ax.set(title=f"{setting.upper()}: {key.split('/')[-1]}", xlabel="step")
            ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "diagnostics.png"))
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)
    return paths
