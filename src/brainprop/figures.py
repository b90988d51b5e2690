"""The paper's figures (Raugel et al. 2026) and the sister paper's half-times, one function each.

Each ``fig_*`` function takes the rule's ``input`` and ``params`` (Snakemake namedlists or plain
mappings of paths and settings), computes its numbers with :mod:`brainprop.analysis`, and returns
``(figure, numbers)``: a matplotlib figure and a tidy table of every number it shows (columns
``statistic, model, checkpoint, modality, signal, layer, value`` and more). :func:`make_figure`
saves both (PDF + CSV), the rule entry point. See docs/figures.md for what each panel shows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import cm, colors  # noqa: E402

from brainprop import analysis as an  # noqa: E402
from brainprop.fmri_arrays import read_fmri  # noqa: E402
from brainprop.utils import atomic_output, get_logger  # noqa: E402

log = get_logger(__name__)

LABELS = {"forward": "Forward", "backprop": "Backprop", "forward+backprop": "Forward + Backprop",
          "residual": "Residual backprop"}
MODALITIES = {"meg": ("MEG", "tab:green"), "fmri": ("fMRI", "tab:blue")}
PANEL_SIGNALS = ("forward", "backprop", "residual")
R_LABEL = "encoding score (Pearson r)"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "pdf.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False})


# --------------------------------------------------------------------------------------------
# loading and small helpers
# --------------------------------------------------------------------------------------------

def _paths(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _read(paths, last_layer: bool = False) -> pd.DataFrame:
    """Concatenated Parquet tables (MEG; fMRI results are arrays, :func:`brainprop.fmri_arrays.read_fmri`);
    with ``last_layer`` only the rows of each model's deepest layer (``layer_depth == 1``)."""
    filters = [("layer_depth", "==", 1.0)] if last_layer else None
    tables = [pd.read_parquet(p, filters=filters) for p in _paths(paths)]
    empty = [str(p) for p, t in zip(_paths(paths), tables) if t.empty]
    if empty:
        raise ValueError(f"no rows{' of the last layer (layer_depth == 1)' if last_layer else ''} in {empty}")
    return pd.concat(tables, ignore_index=True)


def _numbers(rows: list[dict]) -> pd.DataFrame:
    cols = ["statistic", "model", "checkpoint", "modality", "signal", "layer", "value"]
    table = pd.DataFrame(rows)
    return table[cols + [c for c in table.columns if c not in cols]]


def _label(ax, letter: str) -> None:
    ax.text(-0.12, 1.06, letter, transform=ax.transAxes, fontsize=12, fontweight="bold", va="bottom")


def _surfaces(params):
    from brainprop.surface import read_surfaces

    return read_surfaces(params["fsaverage_dir"], params["surface"])


def _smooth(params):
    return (params["smoothing_iterations"], params["smoothing_weight"]) if params["smoothing_iterations"] else None


def _map_panel(fig, spec, surfaces, values, title, cmap, vmin, vmax, label, params, letter=None,
               views=("lateral", "medial", "ventral")):
    from brainprop.surface import plot_surface_panel

    axes = plot_surface_panel(fig, spec, surfaces, values, cmap=cmap, vmin=vmin, vmax=vmax, title=title,
                              smooth=_smooth(params), colorbar_label=label, views=views)
    if letter:
        axes[0].text2D(-0.1, 1.1, letter, transform=axes[0].transAxes, fontsize=12, fontweight="bold")
    return axes


def _score_scale(values: np.ndarray, signal: str) -> tuple[str, float, float]:
    """(colormap, vmin, vmax) of a score map: 0 to the 99th percentile of |shown values|; the residual, a
    difference of scores that can be negative, on a diverging map centred on 0."""
    vals = np.abs(values[np.isfinite(values)])
    top = max(float(np.percentile(vals, 99)) if len(vals) else 1.0, 1e-3)
    return ("RdBu_r", -top, top) if signal == "residual" else ("hot", 0.0, top)


def _sig_marks(ax, times, significant, y, color, size=6):
    """Asterisks at ``y`` over the significant time points."""
    t = np.asarray(times)[np.asarray(significant, bool)]
    ax.plot(t, np.full(len(t), y), ls="none", marker=(6, 2, 0), ms=size * 0.6, color=color, mew=0.8)


def _corr_text(c: an.Correlation, spearman: bool = True) -> str:
    """"r = .. (p = ..), rho = .. (p = ..)", or a plain statement when the correlation is undefined."""
    if not np.isfinite(c.r):
        return "r n/a (constant or < 3 points)"
    text = f"r = {c.r:.2f} (p = {c.p:.1e})"
    return text + (f", rho = {c.rho:.2f} (p = {c.p_spearman:.1e})" if spearman else "")


def _time_axis(ax):
    ax.axvline(0, color="0.6", lw=0.6, ls="--")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("time from image onset (s)")
    ax.set_ylabel(R_LABEL)


def _rois(inputs, params) -> tuple[pd.DataFrame, np.ndarray]:
    """The analysis ROIs (``figures.roi_hemispheres``: merged areas, or one per hemisphere) and the
    per-vertex labels (2V,)."""
    from brainprop.brain.atlas import analysis_rois

    return analysis_rois(pd.read_parquet(inputs["rois"]), params["roi_hemispheres"]), np.load(inputs["vertex_rois"])


def _spatial(fmri: pd.DataFrame, rois: pd.DataFrame, vertex_rois: np.ndarray, signal: str, params) -> an.SpatialResult:
    """:func:`brainprop.analysis.spatial_score` with the figure's settings."""
    return an.spatial_score(fmri, vertex_rois, rois, signal, params["min_significant"], params["roi_fraction"],
                            params["distance"], params["roi_best_layer"])


def spatial_rows(res: an.SpatialResult, **keys) -> list[dict]:
    """Number rows of a Spatial score: Pearson r and p, Spearman rho and p, each with ``n_rois`` (ROIs in
    the correlation: the best-encoded tercile) and ``n_rois_ranked`` (ROIs ranked for the tercile)."""
    c = res.correlation
    return [{"statistic": stat, **keys, "value": val, "n_rois": c.n, "n_rois_ranked": res.n_ranked}
            for stat, val in (("spatial_r", c.r), ("spatial_p", c.p), ("spatial_rho", c.rho),
                              ("spatial_p_spearman", c.p_spearman))]


#: Axis names of the ``figures.distance`` columns.
DISTANCE_LABELS = {"dist_geodesic": "geodesic", "dist_euclidean": "Euclidean",
                   "dist_geodesic_centroid": "geodesic, at the centroid"}


def final_checkpoint(table: pd.DataFrame) -> str:
    """Name of the last checkpoint (highest iteration) present in a table."""
    return max(table["checkpoint"].unique(), key=an.checkpoint_iteration)


# --------------------------------------------------------------------------------------------
# Fig. 2 and Fig. S1: hierarchy of forward and backprop
# --------------------------------------------------------------------------------------------

def _meg_layers(meg: pd.DataFrame, signal: str) -> pd.DataFrame:
    """Per layer (depth bin shared by the models) the model-averaged mean course and the share of
    models in which each time point is significant."""
    sub = meg[meg["signal"] == signal].copy()
    n_bins = int(sub.groupby("model")["layer"].nunique().min())
    sub["bin"] = sub.groupby("model")["layer_depth"].transform(lambda d: an.depth_bins(d, n_bins))
    out = sub.groupby(["bin", "time"], sort=True).agg(mean=("mean", "mean"),
                                                      significant=("significant", "mean")).reset_index()
    out["layer_depth"] = out["bin"] / max(n_bins - 1, 1)
    return out


def fig_hierarchy(inputs, params):
    """Fig. 2 (one model) / Fig. S1 (several): best-layer maps (A-B), distance from V1 vs best layer
    over the best-encoded ROIs (C-D), MEG time courses per layer (E-F), forward and backprop."""
    meg = _read(inputs["meg"])
    rois, vertex_rois = _rois(inputs, params)
    n_v = len(vertex_rois)
    models, checkpoints, per_signal = [], [], {"forward": ([], []), "backprop": ([], [])}
    for path in _paths(inputs["fmri"]):  # one model at a time (real size: 327k vertices x 12 layers x 2 signals)
        g = read_fmri(path, signals=("forward", "backprop"))
        models.append(g["model"].iloc[0])
        checkpoints.append(g["checkpoint"].iloc[0])
        for signal, (maps, spatial) in per_signal.items():
            best = an.best_layer_per_vertex(g, signal, params["min_significant"])
            maps.append((best.vertex.to_numpy(), best.layer_depth.to_numpy()))
            spatial.append(_spatial(g, rois, vertex_rois, signal, params))
        del g
    need, checkpoint = an.min_models(len(models)), ",".join(sorted(set(checkpoints)))
    surfaces = _surfaces(params)
    fig = plt.figure(figsize=(11, 12.5), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1.25, 1, 1])
    rows, depth_cmap = [], plt.get_cmap("viridis")
    for col, signal in enumerate(("forward", "backprop")):
        letter_map, letter_sc, letter_meg = "AB"[col], "CD"[col], "EF"[col]
        maps, spatial = per_signal[signal]
        values = an.mean_vertex_map(maps, n_v, need)
        _map_panel(fig, grid[0, col], surfaces, values, f"{LABELS[signal]}: best layer", "viridis", 0.0, 1.0,
                   "best layer (normalised depth k)", params, letter_map)
        res = an.combined_spatial(spatial, params["roi_fraction"], params["distance"])
        sel = res.rois[res.rois["selected"]]
        ax = fig.add_subplot(grid[1, col])
        ax.scatter(sel[params["distance"]], sel["best_layer"], c=sel["best_layer"], cmap=depth_cmap, vmin=0, vmax=1,
                   s=22, edgecolor="k", lw=0.3)
        c = res.correlation
        if np.isfinite(c.r):
            slope, icpt = np.polyfit(sel[params["distance"]], sel["best_layer"], 1)
            xs = np.linspace(sel[params["distance"]].min(), sel[params["distance"]].max(), 2)
            ax.plot(xs, slope * xs + icpt, color="k", lw=1)
        ax.set_title(f"{LABELS[signal]}: {_corr_text(c)}, {c.n} of {res.n_ranked} ROIs")
        ax.set_xlabel(f"ROI distance from V1 ({DISTANCE_LABELS[params['distance']]}, mm)")
        ax.set_ylabel("best layer (normalised depth k)")
        ax.set_ylim(-0.05, 1.05)
        _label(ax, letter_sc)
        rows += spatial_rows(res, model="+".join(models), checkpoint=checkpoint, modality="fmri", signal=signal,
                             layer="all")
        courses = _meg_layers(meg, signal)
        ax = fig.add_subplot(grid[2, col])
        top = courses["mean"].max()
        for i, (depth, g) in enumerate(courses.groupby("layer_depth", sort=True)):
            color = depth_cmap(depth)
            ax.plot(g["time"], g["mean"], color=color, lw=1.2)
            _sig_marks(ax, g["time"], g["significant"] >= 0.5 if len(models) > 1 else g["significant"] > 0,
                       top * (1.04 + 0.025 * i), color, size=4)
        after = courses[courses["time"] >= an.ONSET]  # peaks after image onset, as an.peak_times
        peaks = an.peak_times(meg[meg["model"] == models[0]], signal) if len(models) == 1 else (
            after.loc[after.groupby("bin")["mean"].idxmax()].rename(columns={"time": "peak_time",
                                                                             "mean": "peak_score"}))
        tc = an.correlation(peaks["layer_depth"], peaks["peak_time"])
        ax.set_title(f"{LABELS[signal]} (MEG): peak time vs depth, {_corr_text(tc, spearman=False)}")
        _time_axis(ax)
        fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), depth_cmap), ax=ax, label="layer depth k",
                     fraction=0.04, pad=0.01)
        _label(ax, letter_meg)
        rows.append({"statistic": "temporal_r", "model": "+".join(models), "checkpoint": checkpoint,
                     "modality": "meg", "signal": signal, "layer": "all", "value": tc.r, "p": tc.p})
        for _, p in peaks.iterrows():
            rows.append({"statistic": "meg_peak_time", "model": "+".join(models), "checkpoint": checkpoint,
                         "modality": "meg", "signal": signal, "layer": f"k={p['layer_depth']:.2f}",
                         "value": p["peak_time"], "peak_score": p["peak_score"]})
    fig.suptitle(params["title"], fontsize=11)
    return fig, _numbers(rows)


# --------------------------------------------------------------------------------------------
# Fig. 3: per model, forward / backprop / residual (last layer)
# --------------------------------------------------------------------------------------------

def _summaries(inputs, params) -> pd.DataFrame:
    subjects = read_fmri(inputs["fmri_subjects"], last_layer=True) if "fmri_subjects" in inputs.keys() else None
    return an.summary_scores(_read(inputs["meg"], last_layer=True), read_fmri(inputs["fmri"], last_layer=True),
                             subjects, min_significant=params["min_significant"])


def _summary_rows(summary: pd.DataFrame, statistic: str) -> list[dict]:
    return [{"statistic": statistic, "model": r.model, "checkpoint": r.checkpoint, "modality": r.modality,
             "signal": r.signal, "layer": r.layer, "value": r.score, "sem": r.sem, "p": r.pvalue,
             "n_subjects": r.n_subjects, **({"peak_time": r.peak_time} if r.modality == "meg" else
                                             {"n_vertices": r.n_vertices})}
            for r in summary.itertuples()]


def fig_residual(inputs, params):
    """Fig. 3: last-layer encoding score of each model for forward, backprop and residual; top MEG
    (max over time of the mean course), bottom fMRI (mean over significant vertices), SEM across
    subjects and significance stars."""
    summary = _summaries(inputs, params)
    summary = summary[summary["signal"].isin(PANEL_SIGNALS)]
    families = params["families"]  # {model: family}, in config order
    order = list(dict.fromkeys(families.values()))
    models = sorted(dict.fromkeys(params["models"]), key=lambda m: order.index(families[m]))
    bounds = [i + 0.5 for i in range(len(models) - 1) if families[models[i]] != families[models[i + 1]]]
    fig, axes = plt.subplots(2, 3, figsize=(max(10, 1.2 * len(models) * 3 / 2), 6), layout="constrained", sharey="row")
    for row, modality in enumerate(("meg", "fmri")):
        name, color = MODALITIES[modality]
        for col, signal in enumerate(PANEL_SIGNALS):
            ax = axes[row, col]
            s = summary[(summary["modality"] == modality) & (summary["signal"] == signal)].set_index("model")
            s = s.reindex(models)
            x = np.arange(len(models))
            ax.bar(x, s["score"], yerr=s["sem"], width=0.6, color=color, alpha=0.85, capsize=3, ecolor="k")
            ax.set_xlim(-0.8, len(models) - 0.2)
            for xi, (score, sem, st) in enumerate(zip(s["score"], s["sem"].fillna(0), s["stars"].fillna(""))):
                if np.isfinite(score):
                    ax.text(xi, score + sem, st, ha="center", va="bottom", fontsize=10)
            ax.set_xticks(x, models, rotation=30, ha="right")
            for b in bounds:  # families apart, as in the paper
                ax.axvline(b, color="0.7", lw=0.6, ls="--")
            ax.axhline(0, color="0.5", lw=0.6)
            ax.set_title(f"{name}: {LABELS[signal]}")
            _label(ax, "ABCDEF"[row * 3 + col])
            if col == 0:
                ax.set_ylabel("max over time of mean r" if modality == "meg" else "mean r, significant vertices")
            ax.margins(y=0.15)
    fig.suptitle("Last-layer encoding scores per model, grouped by family (" + ", ".join(order)
                 + "; * p < .05, ** p < .01, *** p < .001)")
    return fig, _numbers(_summary_rows(summary, "encoding_score"))


# --------------------------------------------------------------------------------------------
# Fig. 4: averaged across models
# --------------------------------------------------------------------------------------------

def fig_models_mean(inputs, params):
    """Fig. 4: surface maps of the mean score across models (significant vertices; A, C, E) and MEG
    courses, mean +- SEM across subjects and models with FDR-corrected t-test marks (B, D, F)."""
    from brainprop.scoring import meg_subject_courses

    fmri = read_fmri(inputs["fmri"], last_layer=True)
    courses = meg_subject_courses(inputs["meg_subjects"])
    deepest = courses.groupby("model")["layer_depth"].transform("max")
    courses = courses[courses["layer_depth"] == deepest]
    stats = an.course_statistics(courses, ["signal"], ["subject", "model"], q=params["q"])
    vertex_rois = np.load(inputs["vertex_rois"])
    models = sorted(fmri["model"].unique())
    maps = {}
    for signal in PANEL_SIGNALS:
        per = [an.significant_map(fmri[fmri["model"] == m], signal, None, params["min_significant"]) for m in models]
        maps[signal] = an.mean_vertex_map([(p.vertex.to_numpy(), p.score.to_numpy()) for p in per], len(vertex_rois),
                                          an.min_models(len(models)))
    surfaces = _surfaces(params)
    fig = plt.figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.3, 1])
    rows = []
    for col, signal in enumerate(PANEL_SIGNALS):
        _map_panel(fig, grid[0, col], surfaces, maps[signal], f"{LABELS[signal]} (fMRI)",
                   *_score_scale(maps[signal], signal), "mean encoding score (r)", params, "ACE"[col])
        st = stats[stats["signal"] == signal]
        ax = fig.add_subplot(grid[1, col])
        ax.plot(st["time"], st["mean"], color="k", lw=1.2)
        ax.fill_between(st["time"], st["mean"] - st["sem"], st["mean"] + st["sem"], color="0.7", lw=0)
        _sig_marks(ax, st["time"], st["significant"], (st["mean"] + st["sem"]).max() * 1.08, "k")
        ax.set_title(f"{LABELS[signal]} (MEG, n = {int(st['n'].iloc[0])} subject x model)")
        _time_axis(ax)
        _label(ax, "BDF"[col])
        m = maps[signal]
        rows.append({"statistic": "fmri_mean_score_significant", "model": "+".join(models), "checkpoint": "final",
                     "modality": "fmri", "signal": signal, "layer": "last", "value": float(np.nanmean(m)),
                     "n_vertices": int(np.isfinite(m).sum())})
        peak = st.loc[st.loc[st["time"] >= an.ONSET, "mean"].idxmax()]
        rows.append({"statistic": "meg_peak_score", "model": "+".join(models), "checkpoint": "final",
                     "modality": "meg", "signal": signal, "layer": "last", "value": peak["mean"],
                     "peak_time": peak["time"], "p": peak["pvalue_fdr"]})
    fig.suptitle(f"Averaged across models ({', '.join(models)}), last layer; * FDR-corrected p < 0.05")
    return fig, _numbers(rows)


# --------------------------------------------------------------------------------------------
# Fig. 5-7: training from scratch
# --------------------------------------------------------------------------------------------

def _iterations_axis(ax, iterations):
    ax.set_xscale("symlog", linthresh=max(1, min([i for i in iterations if i > 0], default=1)))
    ax.set_xlabel("training iteration")


def fig_training(inputs, params):
    """Fig. 5: last-layer forward, backprop and residual scores across checkpoints; MEG (green) and fMRI
    (blue), SEM across subjects."""
    summary = _summaries(inputs, params)
    summary = summary[summary["signal"].isin(PANEL_SIGNALS)].copy()
    summary["iteration"] = summary["checkpoint"].map(an.checkpoint_iteration)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained", sharey=True)
    for col, signal in enumerate(PANEL_SIGNALS):
        ax = axes[col]
        for modality, (name, color) in MODALITIES.items():
            s = summary[(summary["signal"] == signal) & (summary["modality"] == modality)].sort_values("iteration")
            ax.errorbar(s["iteration"], s["score"], yerr=s["sem"], color=color, marker="o", ms=4, capsize=3,
                        label=name)
        _iterations_axis(ax, summary["iteration"].unique())
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_title(LABELS[signal])
        _label(ax, "ABC"[col])
    axes[0].set_ylabel("last-layer " + R_LABEL)
    axes[0].legend(title="MEG: max over time\nfMRI: mean, significant vertices", loc="center right")
    fig.suptitle(f"{params['model']}: encoding scores across training")
    return fig, _numbers(_summary_rows(summary, "encoding_score"))


def fig_training_maps(inputs, params):
    """Fig. 6: fMRI maps of the last-layer forward, backprop and residual scores (rows) at three training
    stages (columns); significant vertices only, one colour scale per row."""
    fmri = read_fmri(inputs["fmri"], last_layer=True)
    vertex_rois = np.load(inputs["vertex_rois"])
    stages = [f"it{s}" for s in params["stages"]]
    surfaces = _surfaces(params)
    fig = plt.figure(figsize=(12, 11), layout="constrained")
    grid = fig.add_gridspec(3, len(stages))
    rows = []
    for r, signal in enumerate(PANEL_SIGNALS):
        maps = []
        for stage in stages:
            m = an.significant_map(fmri[fmri["checkpoint"] == stage], signal, None, params["min_significant"])
            maps.append(an.vertex_array(m.vertex, m.score, len(vertex_rois)))
        scale = _score_scale(np.concatenate(maps), signal)
        for c, (stage, m) in enumerate(zip(stages, maps)):
            _map_panel(fig, grid[r, c], surfaces, m, f"{LABELS[signal]}, iteration {an.checkpoint_iteration(stage)}",
                       *scale, "encoding score (r)", params, "ABCDEFGHIJKLMNOPQR"[r * len(stages) + c],
                       views=("lateral", "medial"))
            rows.append({"statistic": "fmri_mean_score_significant", "model": params["model"], "checkpoint": stage,
                         "modality": "fmri", "signal": signal, "layer": "last",
                         "value": float(np.nanmean(m)) if np.isfinite(m).any() else np.nan,
                         "n_vertices": int(np.isfinite(m).sum())})
    fig.suptitle(f"{params['model']}: last-layer fMRI encoding across training (significant vertices)")
    return fig, _numbers(rows)


def fig_training_meg(inputs, params):
    """Fig. 7: MEG courses of the last-layer forward, backprop and residual scores (rows) at three training
    stages (colours), SEM across subjects, FDR-corrected significance marks."""
    meg = _read(inputs["meg"])
    meg = meg[meg["layer_depth"] == meg["layer_depth"].max()]
    stages = [f"it{s}" for s in params["stages"]]
    cmap = plt.get_cmap("plasma")
    fig, axes = plt.subplots(len(PANEL_SIGNALS), 1, figsize=(7, 8.5), layout="constrained", sharex=True)
    rows = []
    for r, signal in enumerate(PANEL_SIGNALS):
        ax = axes[r]
        s = meg[meg["signal"] == signal]
        top = (s["mean"] + s["sem"]).max()
        for i, stage in enumerate(stages):
            g = s[s["checkpoint"] == stage].sort_values("time")
            color = cmap(i / max(len(stages) - 1, 1) * 0.85)
            it = an.checkpoint_iteration(stage)
            ax.plot(g["time"], g["mean"], color=color, lw=1.3, label=f"iteration {it}")
            ax.fill_between(g["time"], g["mean"] - g["sem"], g["mean"] + g["sem"], color=color, alpha=0.2, lw=0)
            _sig_marks(ax, g["time"], g["significant"], top * (1.06 + 0.06 * i), color)
            peak = g.loc[g.loc[g["time"] >= an.ONSET, "mean"].idxmax()]
            rows.append({"statistic": "meg_peak_score", "model": params["model"], "checkpoint": stage,
                         "modality": "meg", "signal": signal, "layer": peak["layer"], "value": peak["mean"],
                         "peak_time": peak["time"], "p": peak["pvalue_fdr"]})
        ax.set_title(f"{LABELS[signal]} (MEG, last layer)")
        _time_axis(ax)
        if r < len(PANEL_SIGNALS) - 1:
            ax.set_xlabel("")
        _label(ax, "ABC"[r])
    axes[0].legend(loc="upper right")
    fig.suptitle(f"{params['model']}: MEG encoding across training (* FDR-corrected p < 0.05)")
    return fig, _numbers(rows)


# --------------------------------------------------------------------------------------------
# Fig. S2: robustness grid
# --------------------------------------------------------------------------------------------

def fig_robustness(inputs, params):
    """Fig. S2: backprop score as a function of PCA (x) and projection (y) dimension, MEG and fMRI (top);
    forward score against PCA dimension (bottom)."""
    grid = pd.read_parquet(inputs["grid"])
    fig, axes = plt.subplots(2, 2, figsize=(9, 7), layout="constrained")
    rows = []
    for col, modality in enumerate(("meg", "fmri")):
        name, color = MODALITIES[modality]
        g = grid[(grid["modality"] == modality) & (grid["signal"] == "backprop")]
        wide = g.pivot(index="projection_dim", columns="pca_dim", values="score").sort_index(ascending=False)
        ax = axes[0, col]
        im = ax.imshow(wide.to_numpy(np.float64), cmap="viridis", aspect="auto")
        ax.set_xticks(range(wide.shape[1]), wide.columns)
        ax.set_yticks(range(wide.shape[0]), wide.index)
        for (i, j), v in np.ndenumerate(wide.to_numpy(np.float64)):
            ax.text(j, i, "n/a: PCA dim >\nprojection dim" if np.isnan(v) else f"{v:.3f}", ha="center",
                    va="center", fontsize=6 if np.isnan(v) else 7,
                    color="w" if v < np.nanmean(wide.to_numpy(np.float64)) else "k")
        ax.set_xlabel("PCA dimension")
        ax.set_ylabel("random projection dimension")
        ax.set_title(f"{name}: Backprop")
        fig.colorbar(im, ax=ax, label=R_LABEL if modality == "fmri" else "max over time of mean r")
        _label(ax, "AB"[col])
        f = grid[(grid["modality"] == modality) & (grid["signal"] == "forward")].sort_values("pca_dim")
        ax = axes[1, col]
        ax.plot(f["pca_dim"], f["score"], marker="o", color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(f["pca_dim"], f["pca_dim"])
        ax.set_xlabel("PCA dimension (no random projection)")
        ax.set_ylabel(R_LABEL if modality == "fmri" else "max over time of mean r")
        ax.set_title(f"{name}: Forward")
        _label(ax, "CD"[col])
        for r in grid[grid["modality"] == modality].itertuples():
            rows.append({"statistic": "robustness_score", "model": params["model"], "checkpoint": params["checkpoint"],
                         "modality": modality, "signal": r.signal, "layer": params["layer"], "value": r.score,
                         "projection_dim": r.projection_dim, "pca_dim": r.pca_dim})
    fig.suptitle(f"{params['model']} {params['checkpoint']}, layer {params['layer']}: robustness to dimensions")
    return fig, _numbers(rows)


# --------------------------------------------------------------------------------------------
# sister paper: Encoding, Spatial and Temporal scores across training, and half-times
# --------------------------------------------------------------------------------------------

def checkpoint_metrics(fmri: pd.DataFrame, meg: pd.DataFrame, rois: pd.DataFrame, vertex_rois,
                       params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One checkpoint's training metrics, for forward and backprop: the Encoding scores (MEG, fMRI; last
    layer), the Spatial score (Pearson r, distance vs best layer) and the Temporal score (Pearson r, depth
    vs peak time), as rows (checkpoint, signal, metric, value); and, per ROI, the mean over its vertices
    of the last-layer forward score (all vertices: significance changes over training)."""
    checkpoint = fmri["checkpoint"].iloc[0]
    if set(fmri["checkpoint"]) != {checkpoint} or set(meg["checkpoint"]) != {checkpoint}:
        raise ValueError(f"checkpoint_metrics needs one checkpoint; got fMRI {sorted(set(fmri['checkpoint']))}, "
                         f"MEG {sorted(set(meg['checkpoint']))}")
    summary = an.summary_scores(meg, fmri, min_significant=params["min_significant"])
    rows = [{"checkpoint": checkpoint, "signal": r.signal, "metric": f"encoding_{r.modality}", "value": r.score}
            for r in summary[summary["signal"].isin(("forward", "backprop"))].itertuples()]
    for signal in ("forward", "backprop"):
        sp = _spatial(fmri, rois, vertex_rois, signal, params)
        tp = an.temporal_score(an.peak_times(meg, signal))
        rows += [{"checkpoint": checkpoint, "signal": signal, "metric": "spatial", "value": sp.correlation.r,
                  "n_rois": sp.correlation.n, "n_rois_ranked": sp.n_ranked},
                 {"checkpoint": checkpoint, "signal": signal, "metric": "temporal", "value": tp.r}]
    last = fmri[(fmri["signal"] == "forward") & (fmri["layer_depth"] == fmri["layer_depth"].max())]
    per_roi = an.roi_means(an.vertex_array(last["vertex"], last["mean"], len(vertex_rois)), vertex_rois, rois)
    return pd.DataFrame(rows), per_roi.assign(checkpoint=checkpoint)


def fig_halftime(inputs, params):
    """Sister paper (Raugel et al. 2025): Encoding (A), Spatial (B) and Temporal (C) scores across
    training for forward and backprop, their half-times (D), and the half-time of each ROI's forward
    encoding against its distance from V1 (E)."""
    rois, vertex_rois = _rois(inputs, params)
    frac = params["halftime_fraction"]
    # one checkpoint at a time (real size: 327k vertices x 12 layers x 2 signals each)
    parts = [checkpoint_metrics(read_fmri(f, signals=("forward", "backprop")), _read(m), rois, vertex_rois, params)
             for f, m in zip(_paths(inputs["fmri"]), _paths(inputs["meg"]), strict=True)]
    metrics = pd.concat([p[0] for p in parts], ignore_index=True)
    per_roi = pd.concat([p[1] for p in parts], ignore_index=True)
    metrics["iteration"] = metrics["checkpoint"].map(an.checkpoint_iteration)
    # Spatial/Temporal scores start around 0 (or below): half-time from the initial value
    halves = pd.concat([
        an.half_times(metrics[metrics["metric"].str.startswith("encoding")], "value", ["metric", "signal"], frac),
        an.half_times(metrics[~metrics["metric"].str.startswith("encoding")], "value", ["metric", "signal"], frac,
                      from_initial=True)], ignore_index=True)
    roi_half = an.half_times(per_roi, "mean", ["hemi", "roi"], frac).merge(rois, on=["hemi", "roi"])
    fig = plt.figure(figsize=(11, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    styles = {"forward": "-", "backprop": "--"}
    its = sorted(metrics["iteration"].unique())
    panels = [("A", ["encoding_meg", "encoding_fmri"], "Encoding score (last layer, r)"),
              ("B", ["spatial"], "Spatial score (r, distance vs best layer)"),
              ("C", ["temporal"], "Temporal score (r, depth vs peak time)")]
    metric_colors = {"encoding_meg": MODALITIES["meg"][1], "encoding_fmri": MODALITIES["fmri"][1],
                     "spatial": "tab:purple", "temporal": "tab:orange"}
    for i, (letter, names, ylabel) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for name in names:
            for signal, ls in styles.items():
                s = metrics[(metrics["metric"] == name) & (metrics["signal"] == signal)].sort_values("iteration")
                ax.plot(s["iteration"], s["value"], ls=ls, marker="o", ms=3, color=metric_colors[name],
                        label=f"{name.replace('encoding_', '').upper() if 'encoding' in name else name}, {signal}")
        _iterations_axis(ax, its)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        _label(ax, letter)
    ax = fig.add_subplot(grid[1, :2])
    labels = [f"{m.replace('encoding_', 'encoding ')}\n{s}" for m, s in zip(halves["metric"], halves["signal"])]
    ax.bar(np.arange(len(halves)), halves["half_time"],
           color=[metric_colors[m] for m in halves["metric"]], alpha=0.85,
           hatch=["" if s == "forward" else "//" for s in halves["signal"]])
    ax.set_xticks(np.arange(len(halves)), labels, fontsize=7)
    ax.set_ylabel(f"half-time (iteration reaching {frac:.0%} of final)")
    ax.set_yscale("symlog", linthresh=1)
    for x, v in enumerate(halves["half_time"]):
        ax.text(x, v if np.isfinite(v) else 0, "n/a" if not np.isfinite(v) else f"{v:.0f}", ha="center",
                va="bottom", fontsize=7)
    _label(ax, "D")
    ax = fig.add_subplot(grid[1, 2])
    c = an.correlation(roi_half[params["distance"]], roi_half["half_time"])
    ax.scatter(roi_half[params["distance"]], roi_half["half_time"], s=14, color="tab:blue", edgecolor="k", lw=0.3)
    if roi_half["half_time"].max() > 1:
        ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel(f"ROI distance from V1 ({DISTANCE_LABELS[params['distance']]}, mm)")
    ax.set_ylabel("half-time of forward encoding (iteration)")
    ax.set_title(f"per ROI (n = {c.n})\n{_corr_text(c, spearman=False)}")
    _label(ax, "E")
    fig.suptitle(f"{params['model']}: training dynamics and half-times ({frac:.0%} of final value)")
    rows = [{"statistic": f"{r.metric}_score", "model": params["model"], "checkpoint": r.checkpoint,
             "modality": "meg" if r.metric in ("temporal", "encoding_meg") else "fmri", "signal": r.signal,
             "layer": "last" if r.metric.startswith("encoding") else "all", "value": r.value,
             **({"n_rois": r.n_rois, "n_rois_ranked": r.n_rois_ranked} if r.metric == "spatial" else {})}
            for r in metrics.itertuples()]
    rows += [{"statistic": f"half_time_{r.metric}", "model": params["model"], "checkpoint": "all",
              "modality": "meg" if r.metric in ("temporal", "encoding_meg") else "fmri", "signal": r.signal,
              "layer": "last" if r.metric.startswith("encoding") else "all", "value": r.half_time, "final": r.final}
             for r in halves.itertuples()]
    rows.append({"statistic": "roi_half_time_vs_distance_r", "model": params["model"], "checkpoint": "all",
                 "modality": "fmri", "signal": "forward", "layer": "last", "value": c.r, "p": c.p, "n_rois": c.n})
    return fig, _numbers(rows)


# --------------------------------------------------------------------------------------------
# rule entry point and the headline table
# --------------------------------------------------------------------------------------------

FIGURES = {
    "fig2_hierarchy": fig_hierarchy,
    "figS1_models_hierarchy": fig_hierarchy,
    "fig3_residual": fig_residual,
    "fig4_models_mean": fig_models_mean,
    "fig5_training": fig_training,
    "fig6_training_maps": fig_training_maps,
    "fig7_training_meg": fig_training_meg,
    "figS2_robustness": fig_robustness,
    "fig_halftime": fig_halftime,
}

#: Values the paper's text reports (Raugel et al. 2026, section 3), by (statistic, signal).
PAPER_VALUES = {
    ("spatial_r", "forward"): 0.35, ("spatial_p", "forward"): 5e-3,
    ("spatial_rho", "forward"): 0.27, ("spatial_p_spearman", "forward"): 3e-2,
    ("spatial_r", "backprop"): -0.27, ("spatial_p", "backprop"): 4e-2,
    ("spatial_rho", "backprop"): -0.34, ("spatial_p_spearman", "backprop"): 8e-3,
    # sister paper (Raugel et al. 2025): half-time of each region vs its distance from V1
    ("roi_half_time_vs_distance_r", "forward"): 0.91,
}
#: Statements of the paper without a single number, shown next to the matching rows.
PAPER_NOTES = {
    ("temporal_r", "forward"): "shallower layers peak earlier (Fig. 2E)",
    ("temporal_r", "backprop"): "all layers peak together (Fig. 2F)",
    ("meg_peak_score", "residual"): "residual highest between 0.5 and 1.7 s (Fig. 4F)",
    ("encoding_score", "residual"): "residual significant in MEG and fMRI for every model (Fig. 3C, F)",
    **{(f"half_time_{m}", "forward"): "sister paper: Temporal ~0.7%, Encoding ~2%, Spatial ~4% of training"
       for m in ("temporal", "encoding_meg", "encoding_fmri", "spatial")},
}
HEADLINE_FIGURES = ("fig2_hierarchy", "fig3_residual", "fig4_models_mean", "fig_halftime")


def make_figure(name: str, inputs, params, pdf: str | os.PathLike, table: str | os.PathLike, dpi: int = 150) -> None:
    """Rule entry point: build figure ``name`` (a key of :data:`FIGURES`), save the PDF and its numbers (CSV)."""
    fig, numbers = FIGURES[name](inputs, params)
    with atomic_output(pdf) as tmp:
        fig.savefig(tmp, format="pdf", dpi=dpi)
    plt.close(fig)
    with atomic_output(table) as tmp:
        numbers.assign(figure=name).to_csv(tmp, index=False)
    log.info("wrote %s and %d numbers to %s", pdf, len(numbers), table)


def headline_table(tables: Mapping[str, str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Rule entry point: the headline statistics of the figures (:data:`HEADLINE_FIGURES`, and the final
    checkpoint rows of Fig. 5) with the paper's value or statement next to ours."""
    parts = []
    for name, path in tables.items():
        t = pd.read_csv(path)
        if name == "fig5_training":
            t = t[t["checkpoint"] == final_checkpoint(t)]
        elif name not in HEADLINE_FIGURES or name == "fig_halftime":
            t = t[t["statistic"].str.contains("half_time")] if name == "fig_halftime" else t.iloc[:0]
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    table = table[table["statistic"] != "meg_peak_time"]
    table["paper_value"] = [PAPER_VALUES.get((s, g), np.nan) for s, g in zip(table["statistic"], table["signal"])]
    table["paper_note"] = [PAPER_NOTES.get((s, g), "") for s, g in zip(table["statistic"], table["signal"])]
    cols = ["figure", "statistic", "model", "checkpoint", "modality", "signal", "layer", "value", "paper_value",
            "paper_note"]
    table = table[cols + [c for c in table.columns if c not in cols]]
    with atomic_output(out) as tmp:
        table.to_csv(tmp, index=False)
    return table
