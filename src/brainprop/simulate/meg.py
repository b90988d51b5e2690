"""A miniature THINGS-MEG in the real on-disk layouts, with planted forward and backprop effects.

What is written under ``root`` (the layouts of OpenNeuro ds004212; ``docs/meg.md``):

* raw BIDS, one FIF file per run (FIF stands in for CTF ``.ds``, which MNE cannot write):
  ``sub-BIGMEG{n}/ses-NN/meg/sub-BIGMEG{n}_ses-NN_task-main_run-NN_meg.fif`` with
  ``_channels.tsv`` (CTF sensor names such as ``MLC11-1609``; type MEGMAG), ``_meg.json``,
  ``_events.tsv`` (``onset, duration, trial_type (exp|test|catch), things_category_nr,
  value (= things_image_nr), sample``; n/a numbers for catch trials), ``ses-NN/*_scans.tsv``;
* ``sourcedata/sample_attributes_P{n}.csv``: one row per trial in session/run/trial order
  (``trial_type, session_nr, run_nr, trial_nr, things_category_nr, things_image_nr,
  image_path``; all ``*_nr`` 1-based, n/a for catch trials);
* ``derivatives/preprocessed/preprocessed_P{n}-epo.fif`` (split into ``derivative_split_size`` files): all
  trials (catch included) in the CSV's order, 0.1-40 Hz, -0.1..1.3 s, 200 Hz, per-epoch
  z-score baseline (-0.1..0 s), ``MRO11-1609`` dropped, like the published derivative;
* ``simulation.json``: the parameters, seed and planted per-layer latencies (ground truth).

Trials: every training image once, every test image ``test_repeats`` times, and
``n_catch_trials`` catch trials showing ``images_catch_meg/catchNNN.jpg``; a seeded
shuffle spreads them over ``n_sessions`` x ``n_runs`` runs; successive onsets are
``soa`` +- ``soa_jitter`` s apart. Onsets in ``events.tsv`` (``onset`` and ``sample``) are
the (photodiode) times the responses are locked to; the trigger channel ``UPPT001`` steps to
64 ``photodiode_delay`` s *earlier* at every trial (catch included) and to 32 once after the
last trial, as in THINGS-MEG, so epochs locked to the trigger see every latency
``photodiode_delay`` s later. In ``n_value_mismatches`` seeded trials per run the events
``value`` names another image (the sample attributes stay right), the quirk neuralset
documents on the real data.

Planted effects (exactly these, nothing else; figures made from simulated data show
these planted effects recovered, not findings about the brain):

1. **forward**: for each layer ``l`` (depth ``k_l = l/(L-1)``) and read-out component
   ``j``, the read-out ``r_l[:, j]`` (seeded Gaussian projection of the layer's forward
   features, :func:`brainprop.simulate.effects.layer_readouts`) times a Gaussian
   temporal bump of sd ``forward_width`` peaking at
   ``t_l = forward_latency[0] + k_l * (forward_latency[1] - forward_latency[0])`` (latency
   increasing with layer depth), times a sensor pattern (unit RMS, per subject, layer,
   component). Amplitude ``forward_weight``.
2. **backprop**: the same with the backprop (gradient) features, peaking at
   ``backprop_latency + backprop_latency_slope * (1 - k_l)`` (default slope 0: all gradient
   layers peak late and together) with sd ``backprop_width`` and gain growing linearly
   with depth from ``backprop_gain[0]`` (shallowest) to ``backprop_gain[1]`` (deepest):
   deeper gradient layers peak higher. With ``orthogonalize_backprop`` the backprop
   read-outs are made uncorrelated (across images) with all forward read-outs, so the
   planted backprop variance is residual to the planted forward signal: variance that only
   backprop explains (residual backprop) is planted at the backprop latencies (late) and
   nowhere else. Amplitude ``backprop_weight``.
3. **evoked**: a response common to all images (z-scoring across images removes it),
   sd ``evoked_width`` at ``evoked_latency``, amplitude ``evoked_amplitude``.
4. **noise**: white (broadband, no line noise) Gaussian noise per sensor of variance
   ``1 / snr`` (:func:`brainprop.simulate.effects.add_noise` with reference variance 1)
   plus slow drifts (sum of ``drift_n_components`` sinusoids with frequencies drawn in
   ``drift_freq_range`` Hz, total amplitude ``drift_amplitude``), which the 0.1 Hz
   high-pass removes.

All latencies of a subject are shifted by one draw of N(0, ``latency_jitter``) s.

Units: each signal is scaled so its variance across images, averaged over sensors, is
``weight**2`` at its peak time (for independent read-outs); noise and drifts use the
same unit; the file stores ``value * 1e-13`` T. A weight of 0 removes a signal exactly
and changes nothing else (the random streams of the noise, trial order and other
signals do not depend on the weights), which is the null used by calibration tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from brainprop.brain.align import reorder_rows
from brainprop.simulate.effects import add_noise, layer_depths, layer_readouts
from brainprop.utils import get_logger, merge_params

log = get_logger(__name__)

__all__ = [
    "DEFAULT_PARAMS",
    "resolve_params",
    "meg_channel_names",
    "planted_latencies",
    "temporal_profiles",
    "response_times",
    "toy_stimulus_table",
    "toy_features",
    "planted_readouts",
    "sensor_patterns",
    "planted_responses",
    "simulate_things_meg",
    "run_simulate_things_meg",
]

SIGNALS = ("forward", "backprop")
SIGNAL_UNIT_T = 1e-13  # one simulation unit = 100 fT in the FIF files
TRIGGER_CHANNEL = "UPPT001"
IMAGE_TRIGGER, END_TRIGGER = 64, 32  # UPPT001 values: every image onset, end of the run (THINGS-MEG)
EPOCH_CODES = {"exp": 1, "test": 2, "catch": 3}  # event ids of the derivative's epochs
DROPPED_IN_DERIVATIVE = "MRO11-1609"

DEFAULT_PARAMS: dict = {
    # design
    "subjects": [1, 2, 3],  # participants n (sub-BIGMEG{n}, P{n}); >= 3 for the across-subject t-test
    "n_sessions": 2,  # sessions per subject
    "n_runs": 2,  # runs per session
    "sfreq": 240.0,  # raw sampling rate (Hz); real data: 1200 Hz
    "n_channels": 24,  # CTF-named sensors (>= 8; always includes MRO11-1609)
    "test_repeats": 3,  # presentations of each test image (THINGS-MEG: 12)
    "n_catch_trials": 6,  # catch trials per subject
    "n_catch_images": 6,  # catch images cycled through (images_catch_meg/catchNNN.jpg)
    "image_duration": 0.5,  # events.tsv duration (s)
    "soa": 1.5,  # mean onset-to-onset interval (s)
    "soa_jitter": 0.2,  # uniform jitter of the interval (+- s)
    "run_padding": 4.0,  # recording before the first and after the last onset (s)
    "photodiode_delay": 0.03,  # the trigger channel leads the events.tsv onsets by this (s)
    "n_value_mismatches": 2,  # exp/test trials per run whose events.tsv value names another image (seeded)
    "line_freq": 60.0,  # PowerLineFrequency in the sidecar (no line noise is simulated)
    # planted effects
    "n_components": 2,  # read-out components per layer and signal
    "forward_weight": 1.0,  # forward amplitude (0: none, the null)
    "forward_latency": [0.15, 0.6],  # peak latency (s) of the shallowest and the deepest forward layer
    "forward_width": 0.05,  # sd (s) of the forward bumps
    "backprop_weight": 1.0,  # backprop amplitude (0: none, the null for backprop and residual)
    "backprop_latency": 0.9,  # peak latency (s) of the deepest gradient layer
    "backprop_latency_slope": 0.0,  # extra latency (s) per unit of (1 - depth); 0: all layers together
    "backprop_width": 0.15,  # sd (s) of the backprop bumps
    "backprop_gain": [0.4, 1.0],  # relative peak of the shallowest and the deepest gradient layer
    "orthogonalize_backprop": True,  # backprop read-outs made uncorrelated with all forward read-outs
    "evoked_amplitude": 3.0,  # image-independent evoked response
    "evoked_latency": 0.12,  # its peak (s)
    "evoked_width": 0.04,  # its sd (s)
    "onset_ramp": 0.05,  # raised-cosine ramp (s) so every response starts at 0 at onset
    "latency_jitter": 0.01,  # sd (s) of a per-subject shift of all latencies
    # noise
    "snr": 1.0,  # planted-signal peak variance / broadband noise variance, raw data
    "drift_amplitude": 5.0,  # slow-drift amplitude (signal units)
    "drift_n_components": 3,  # sinusoids per sensor making the drift
    "drift_freq_range": [0.002, 0.02],  # drift frequencies (Hz), below the 0.1 Hz high-pass
    # derivative (published conventions)
    "derivative_sfreq": 200.0,  # sampling rate (Hz)
    "derivative_tmin": -0.1,  # epoch start (s)
    "derivative_tmax": 1.3,  # epoch end (s)
    "derivative_l_freq": 0.1,  # high-pass (Hz)
    "derivative_h_freq": 40.0,  # low-pass (Hz)
    "derivative_split_size": "2MB",  # FIF split size (real files: 2GB); small so splits are exercised
}


def resolve_params(params: dict | None) -> dict:
    """Return :data:`DEFAULT_PARAMS` updated with ``params``; unknown keys raise ``ValueError``."""
    out = merge_params(DEFAULT_PARAMS, params, "MEG simulation")
    if len(out["subjects"]) < 1:
        raise ValueError("simulation parameter 'subjects' must list at least one subject number")
    if out["n_channels"] < 8:
        raise ValueError(f"simulation parameter 'n_channels' must be >= 8 (so {DROPPED_IN_DERIVATIVE} is "
                         f"among the sensors), got {out['n_channels']}")
    if out["soa"] - out["soa_jitter"] < out["image_duration"]:
        raise ValueError("simulation parameters need soa - soa_jitter >= image_duration (trials must not overlap)")
    if out["run_padding"] < max(out["derivative_tmax"], 3.0) + 0.5:
        raise ValueError("simulation parameter 'run_padding' must exceed the longest epoch (3 s) by 0.5 s, "
                         f"got {out['run_padding']}")
    if out["n_value_mismatches"] < 0:
        raise ValueError(f"simulation parameter 'n_value_mismatches' must be >= 0, got {out['n_value_mismatches']}")
    if not out["snr"] > 0:
        raise ValueError(f"simulation parameter 'snr' must be > 0 (inf for no noise), got {out['snr']}")
    return out


def meg_channel_names(n_channels: int) -> list[str]:
    """CTF-style axial-gradiometer names (``MLC11-1609`` ...), spread over the head, in CTF (sorted) order.

    Names are taken round-robin over the left/right central, frontal, occipital,
    parietal and temporal groups (then the midline ``MZ*``), so any ``n_channels >= 8``
    includes ``MRO11-1609``, the sensor the published derivative drops.
    """
    groups = [f"M{side}{region}" for side in "LR" for region in "CFOPT"]
    numbers = [f"{a}{b}" for a in range(1, 6) for b in range(1, 6)]
    names = []
    for num in numbers:
        for g in groups:
            names.append(f"{g}{num}-1609")
        names.append(f"MZ{'CFOP'[int(num[0]) % 4]}{num}-1609")
    if n_channels > len(names):
        raise ValueError(f"n_channels={n_channels} exceeds the {len(names)} simulated sensor names")
    return sorted(dict.fromkeys(names[:n_channels]))


def planted_latencies(n_layers: int, params: dict) -> dict[str, dict[str, np.ndarray]]:
    """Peak latency (s), width (s) and gain of each layer's temporal bump, per signal.

    Returns
    -------
    dict
        ``{"forward": {"latency": (L,), "width": (L,), "gain": (L,)}, "backprop": {...}}``.
    """
    p = resolve_params(params)
    k = layer_depths(n_layers)
    f0, f1 = p["forward_latency"]
    g0, g1 = p["backprop_gain"]
    return {
        "forward": {"latency": f0 + k * (f1 - f0), "width": np.full(n_layers, float(p["forward_width"])),
                    "gain": np.ones(n_layers)},
        "backprop": {"latency": p["backprop_latency"] + p["backprop_latency_slope"] * (1.0 - k),
                     "width": np.full(n_layers, float(p["backprop_width"])), "gain": g0 + k * (g1 - g0)},
    }


def temporal_profiles(times: np.ndarray, latency: np.ndarray, width: np.ndarray, gain: np.ndarray,
                      onset_ramp: float = 0.0) -> np.ndarray:
    """Gaussian bumps ``gain_l * exp(-(t - latency_l)^2 / (2 width_l^2))``, zero before onset.

    A raised-cosine ramp over ``[0, onset_ramp]`` s makes every response start at 0 at image onset.

    Parameters
    ----------
    times : ndarray, shape (n_times,)
        Seconds relative to image onset.
    latency, width, gain : ndarray, shape (L,)

    Returns
    -------
    profiles : ndarray, shape (L, n_times), float64
    """
    t = np.asarray(times, dtype=np.float64)[None, :]
    bumps = gain[:, None] * np.exp(-((t - latency[:, None]) ** 2) / (2.0 * width[:, None] ** 2))
    ramp = np.clip(t / onset_ramp, 0.0, 1.0) if onset_ramp > 0 else (t >= 0).astype(float)
    ramp = 0.5 - 0.5 * np.cos(np.pi * ramp)
    return bumps * ramp


def response_times(n_layers: int, params: dict) -> np.ndarray:
    """Time grid (s after onset, at ``sfreq``) of the simulated image-locked responses.

    Long enough for every bump to decay (latest latency + 5 widths, at least 1 s).

    Returns
    -------
    times : ndarray, shape (n_times,)
    """
    p = resolve_params(params)
    lat = planted_latencies(n_layers, p)
    end = max(float(np.max(lat[s]["latency"] + 5 * lat[s]["width"])) for s in SIGNALS)
    end = max(end, p["evoked_latency"] + 5 * p["evoked_width"], 1.0)
    return np.arange(int(np.ceil(end * p["sfreq"]))) / p["sfreq"]


def _child_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def planted_readouts(forward: Sequence[np.ndarray], backprop: Sequence[np.ndarray], params: dict,
                     seed: int) -> dict[str, np.ndarray]:
    """Standardized read-outs of each layer's forward and backprop features.

    Parameters
    ----------
    forward, backprop : sequence of L ndarrays, each (n_images, d_l)
        Features ordered by layer depth, rows aligned to the same images.
    params : dict
        Simulation parameters (``n_components``, ``orthogonalize_backprop``).
    seed : int

    Returns
    -------
    dict
        ``{"forward": (L, n_images, K), "backprop": (L, n_images, K)}`` float64, every
        column zero-mean and unit-variance across images. With ``orthogonalize_backprop``
        each backprop column is first regressed on all forward columns (least squares,
        with intercept) and replaced by its residual.
    """
    p = resolve_params(params)
    if len(forward) != len(backprop):
        raise ValueError(f"forward has {len(forward)} layers but backprop has {len(backprop)}")
    K = int(p["n_components"])
    out = {"forward": layer_readouts(forward, K, _child_seed(seed, 1)).astype(np.float64),
           "backprop": layer_readouts(backprop, K, _child_seed(seed, 2)).astype(np.float64)}
    if p["orthogonalize_backprop"]:
        L, n, _ = out["forward"].shape
        design = np.concatenate([np.ones((n, 1)), out["forward"].transpose(1, 0, 2).reshape(n, L * K)], axis=1)
        if n <= design.shape[1]:
            raise ValueError(f"orthogonalize_backprop needs more images ({n}) than forward read-out columns "
                             f"plus one ({design.shape[1]}); lower n_components or set it to false")
        b = out["backprop"].transpose(1, 0, 2).reshape(n, L * K)
        coef, *_ = np.linalg.lstsq(design, b, rcond=None)
        res = b - design @ coef
        sd = res.std(axis=0)
        res = np.where(sd > 0, res / np.where(sd > 0, sd, 1.0), 0.0)
        out["backprop"] = res.reshape(n, L, K).transpose(1, 0, 2)
    return out


def sensor_patterns(n_layers: int, n_components: int, n_channels: int, subject: int, signal: str,
                    seed: int) -> np.ndarray:
    """Seeded Gaussian sensor patterns with unit RMS over sensors, one per layer and component.

    Returns
    -------
    patterns : ndarray, shape (L, K, n_channels), float64
    """
    rng = np.random.default_rng([seed, 10 + SIGNALS.index(signal), subject])
    p = rng.standard_normal((n_layers, n_components, n_channels))
    return p / np.sqrt((p**2).mean(axis=-1, keepdims=True))


def planted_responses(readouts: dict[str, np.ndarray], times: np.ndarray, n_channels: int, subject: int,
                      params: dict, seed: int) -> dict[str, np.ndarray]:
    """Image-locked responses of one subject, one array per planted signal.

    ``resp[s][i, c, t] = w_s / N_s * sum_{l,j} r_s[l, i, j] * g_{s,l}(t) * P_{s}[l, j, c]``
    where ``g`` are :func:`temporal_profiles` (latencies shifted by a per-subject jitter),
    ``P`` are :func:`sensor_patterns` and ``N_s = sqrt(K * max_t sum_l g_{s,l}(t)^2)``.
    Plus ``"evoked"``: the response common to all images, shape (1, n_channels, n_times).

    Parameters
    ----------
    readouts : dict of ndarray (L, n_images, K)
        From :func:`planted_readouts`.
    times : ndarray, shape (n_times,)
        Seconds after image onset.
    n_channels, subject, seed : int
    params : dict

    Returns
    -------
    dict
        ``{"forward": (n_images, C, T), "backprop": (n_images, C, T), "evoked": (1, C, T)}``,
        float64, in simulation units. A signal whose weight is 0 is exactly 0.
    """
    p = resolve_params(params)
    L, n_images, K = readouts["forward"].shape
    jitter = np.random.default_rng([seed, 20, subject]).normal(0.0, p["latency_jitter"])
    lat = planted_latencies(L, p)
    out = {}
    for s in SIGNALS:
        g = temporal_profiles(times, lat[s]["latency"] + jitter, lat[s]["width"], lat[s]["gain"], p["onset_ramp"])
        norm = np.sqrt(K * (g**2).sum(axis=0).max())
        pat = sensor_patterns(L, K, n_channels, subject, s, seed)
        w = float(p[f"{s}_weight"])
        if w == 0.0:
            out[s] = np.zeros((n_images, n_channels, len(times)))
            continue
        out[s] = (w / norm) * np.einsum("lik,lt,lkc->ict", readouts[s], g, pat, optimize=True)
    ev = temporal_profiles(times, np.array([p["evoked_latency"] + jitter]), np.array([p["evoked_width"]]),
                           np.array([1.0]), p["onset_ramp"])[0]
    topo = np.random.default_rng([seed, 30, subject]).standard_normal(n_channels)
    topo /= np.sqrt((topo**2).mean())
    out["evoked"] = (p["evoked_amplitude"] * topo[:, None] * ev[None, :])[None]
    return out


def _design_trials(stim: pd.DataFrame, p: dict, subject: int, seed: int) -> pd.DataFrame:
    """Trial list of one subject: session_nr, run_nr, trial_nr (1-based), trial_type, image row, onsets."""
    rng = np.random.default_rng([seed, 40, subject])
    train = np.flatnonzero(stim.split.to_numpy() == "train")
    test = np.flatnonzero(stim.split.to_numpy() == "test")
    rows = ([("exp", int(i), -1) for i in train]
            + [("test", int(i), -1) for i in test for _ in range(p["test_repeats"])]
            + [("catch", -1, int(c % p["n_catch_images"]) + 1) for c in range(p["n_catch_trials"])])
    trials = pd.DataFrame([rows[i] for i in rng.permutation(len(rows))], columns=["trial_type", "stim_row", "catch_nr"])
    n_run_total = p["n_sessions"] * p["n_runs"]
    if len(trials) < n_run_total:
        raise ValueError(f"{len(trials)} trials cannot fill {n_run_total} runs; add images or lower n_sessions/n_runs")
    bounds = np.linspace(0, len(trials), n_run_total + 1).round().astype(int)
    run_index = np.repeat(np.arange(n_run_total), np.diff(bounds))
    trials["session_nr"] = run_index // p["n_runs"] + 1
    trials["run_nr"] = run_index % p["n_runs"] + 1
    trials["trial_nr"] = trials.groupby(["session_nr", "run_nr"]).cumcount() + 1
    return trials


def _continuous_run(trials: pd.DataFrame, responses: dict, n_channels: int, n_resp: int, p: dict,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Signal + noise + drift of one run (simulation units) and the onset samples of its trials."""
    sf = p["sfreq"]
    soas = p["soa"] + rng.uniform(-p["soa_jitter"], p["soa_jitter"], size=len(trials))
    soas[0] = 0.0
    onsets = np.round((p["run_padding"] + np.cumsum(soas)) * sf).astype(int)
    n_samples = int(onsets[-1] + np.ceil(p["run_padding"] * sf))
    x = np.zeros((n_channels, n_samples + n_resp))
    for onset, row in zip(onsets, trials.itertuples()):
        resp = responses["evoked"][0].copy()
        if row.stim_row >= 0:
            resp += responses["forward"][row.stim_row] + responses["backprop"][row.stim_row]
        x[:, onset:onset + n_resp] += resp
    x = x[:, :n_samples]
    x = add_noise(x.T, p["snr"], rng, reference_variance=1.0).T.astype(np.float64)
    t = np.arange(n_samples) / sf
    n_drift = int(p["drift_n_components"])
    if n_drift > 0 and p["drift_amplitude"] > 0:
        freqs = rng.uniform(*p["drift_freq_range"], size=(n_channels, n_drift, 1))
        phases = rng.uniform(0, 2 * np.pi, size=(n_channels, n_drift, 1))
        x += p["drift_amplitude"] / np.sqrt(n_drift) * np.sin(2 * np.pi * freqs * t + phases).sum(axis=1)
    return x, onsets


def _align_features(stim: pd.DataFrame, features: Sequence[np.ndarray], feature_image_ids: Sequence[str],
                    name: str) -> list[np.ndarray]:
    """Rows of each layer's features in stimulus-table order, matched by image id."""
    return [reorder_rows(f, feature_image_ids, stim.image_id.astype(str), what=f"{name} layer {l}")
            for l, f in enumerate(features)]


def simulate_things_meg(root: str | os.PathLike, stimulus_table: pd.DataFrame | str | os.PathLike,
                        forward: Sequence[np.ndarray], backprop: Sequence[np.ndarray],
                        feature_image_ids: Sequence[str], params: dict | None, seed: int,
                        overwrite: bool = False) -> pd.DataFrame:
    """Write a miniature THINGS-MEG (raw BIDS, sample attributes, preprocessed epochs) under ``root``.

    The tree is built in a temporary sibling folder and moved to ``root`` at the end,
    so an interrupted run never leaves a partial dataset at ``root``.

    Parameters
    ----------
    root : path
        Dataset root to create (must not exist unless ``overwrite``).
    stimulus_table : DataFrame or path to Parquet
        THINGS stimulus table (``image_id, source, concept, split``); ``split`` "train"
        images are shown once, "test" images ``test_repeats`` times.
    forward, backprop : sequence of L ndarrays, each (n_feature_images, d_l)
        Features by layer depth, rows aligned to ``feature_image_ids`` (matched by id).
    feature_image_ids : sequence of str, length n_feature_images
    params : dict or None
        Keys of :data:`DEFAULT_PARAMS` (see ``docs/meg.md``).
    seed : int
        Seed of every random choice (read-outs, patterns, trial order, onsets, noise).
    overwrite : bool
        Replace an existing ``root``.

    Returns
    -------
    trials : DataFrame
        One row per trial of every subject: ``subject, session_nr, run_nr, trial_nr,
        trial_type, image_id, image_path, things_image_nr, things_category_nr, onset, sample,
        value`` (the truth, and ``value`` as written to ``events.tsv``: another image's number
        on the planted mismatches), ``trigger_sample`` (the ``UPPT001`` onset).
    """
    p = resolve_params(params)
    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"simulation root {root} exists; pass overwrite=True to replace it")
    stim = pd.read_parquet(stimulus_table) if not isinstance(stimulus_table, pd.DataFrame) else stimulus_table
    missing_cols = {"image_id", "source", "concept", "split"} - set(stim.columns)
    if missing_cols:
        raise ValueError(f"stimulus table lacks columns {sorted(missing_cols)}")
    stim = stim[stim.split.isin(["train", "test"])].reset_index(drop=True)
    if stim.empty:
        raise ValueError("stimulus table has no 'train' or 'test' images to show")
    fwd = _align_features(stim, forward, feature_image_ids, "forward")
    bwd = _align_features(stim, backprop, feature_image_ids, "backprop")
    readouts = planted_readouts(fwd, bwd, p, seed)
    n_layers = len(fwd)

    # 1-based THINGS numbers: image nr = rank of the image path, category nr = rank of the concept
    image_nr = np.empty(len(stim), dtype=np.int64)
    image_nr[np.argsort(stim.source.to_numpy(), kind="stable")] = np.arange(1, len(stim) + 1)
    concepts = sorted(stim.concept.unique())
    stim = stim.assign(things_image_nr=image_nr,
                       things_category_nr=stim.concept.map({c: i + 1 for i, c in enumerate(concepts)}).astype(int))
    channels = meg_channel_names(p["n_channels"])
    resp_times = response_times(n_layers, p)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    all_trials = []
    try:
        for subject in p["subjects"]:
            responses = planted_responses(readouts, resp_times, len(channels), subject, p, seed)
            trials = _label_trials(_design_trials(stim, p, subject, seed), stim)
            noise_rng = np.random.default_rng([seed, 50, subject])
            trials["onset"], trials["sample"] = np.nan, -1
            trials["value"] = _wrong_values(trials, stim, p, subject, seed)
            trials["trigger_sample"] = -1
            derivative = []
            for (ses, run), run_trials in trials.groupby(["session_nr", "run_nr"], sort=True):
                x, onsets = _continuous_run(run_trials, responses, len(channels), len(resp_times), p, noise_rng)
                trials.loc[run_trials.index, "onset"] = onsets / p["sfreq"]
                trials.loc[run_trials.index, "sample"] = onsets
                trials.loc[run_trials.index, "trigger_sample"] = onsets - int(round(p["photodiode_delay"] * p["sfreq"]))
                raw = _write_raw_run(tmp, subject, ses, run, x, onsets, trials.loc[run_trials.index], channels, p)
                derivative.append(_derivative_epochs(raw, channels, onsets, run_trials.trial_type, p))
            trials["subject"] = subject
            all_trials.append(trials)
            (tmp / "sourcedata").mkdir(exist_ok=True)
            attrs = trials[["trial_type", "session_nr", "run_nr", "trial_nr", "things_category_nr",
                            "things_image_nr", "image_path"]]
            attrs.to_csv(tmp / "sourcedata" / f"sample_attributes_P{subject}.csv", index=False, na_rep="n/a")
            _write_derivative(tmp / "derivatives" / "preprocessed" / f"preprocessed_P{subject}-epo.fif",
                              derivative, p)
            log.info("simulated THINGS-MEG subject BIGMEG%s: %d trials (%d catch) in %d runs", subject, len(trials),
                     int((trials.trial_type == "catch").sum()), p["n_sessions"] * p["n_runs"])
        lat = planted_latencies(n_layers, p)
        summary = {"seed": seed, "params": p, "n_layers": n_layers, "channels": channels,
                   "planted_latencies": {s: {k: v.tolist() for k, v in lat[s].items()} for s in SIGNALS}}
        (tmp / "simulation.json").write_text(json.dumps(summary, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pd.concat(all_trials, ignore_index=True)[
        ["subject", "session_nr", "run_nr", "trial_nr", "trial_type", "image_id", "image_path",
         "things_image_nr", "things_category_nr", "onset", "sample", "value", "trigger_sample"]]


def _wrong_values(trials: pd.DataFrame, stim: pd.DataFrame, p: dict, subject: int, seed: int) -> pd.Series:
    """events.tsv ``value`` of each trial: its image number, except ``n_value_mismatches`` seeded exp/test
    trials per run that get another image's number (the attributes keep the right one)."""
    rng = np.random.default_rng([seed, 70, subject])
    values = trials.things_image_nr.copy()
    numbers = stim.things_image_nr.to_numpy()
    for _, run in trials.groupby(["session_nr", "run_nr"], sort=True):
        shown = run.index[run.trial_type != "catch"]
        for i in rng.choice(shown, size=min(int(p["n_value_mismatches"]), len(shown)), replace=False):
            others = numbers[numbers != values[i]]
            values[i] = int(rng.choice(others)) if len(others) else values[i]
    return values


def _label_trials(trials: pd.DataFrame, stim: pd.DataFrame) -> pd.DataFrame:
    """Add image_id, image_path and the 1-based THINGS numbers (NA for catch trials)."""
    rows = trials.stim_row.to_numpy()
    catch = rows < 0
    safe = np.maximum(rows, 0)
    trials = trials.copy()
    trials["image_id"] = np.where(catch, None, stim.image_id.to_numpy()[safe])
    trials["image_path"] = np.where(catch, [f"images_catch_meg/catch{c:03d}.jpg" for c in trials.catch_nr],
                                    stim.source.to_numpy()[safe])
    for col in ("things_image_nr", "things_category_nr"):
        trials[col] = pd.array(stim[col].to_numpy()[safe], dtype="Int64")
        trials.loc[catch, col] = pd.NA
    return trials


def _write_raw_run(tmp: Path, subject: int, ses: int, run: int, x: np.ndarray, onsets: np.ndarray,
                   run_trials: pd.DataFrame, channels: list[str], p: dict):
    """Write one run as BIDS FIF (mne-bids) plus a THINGS-style events.tsv; return the Raw."""
    import mne
    import mne_bids

    sf = float(p["sfreq"])
    trig = np.zeros((1, x.shape[1]))
    delay, width = int(round(p["photodiode_delay"] * sf)), max(2, int(round(0.01 * sf)))
    for onset in onsets:
        trig[0, onset - delay:onset - delay + width] = IMAGE_TRIGGER
    end = onsets[-1] + int(round(p["image_duration"] * sf))
    trig[0, end:end + width] = END_TRIGGER
    info = mne.create_info(channels + [TRIGGER_CHANNEL], sf, ["mag"] * len(channels) + ["stim"])
    info["line_freq"] = float(p["line_freq"])
    raw = mne.io.RawArray(np.concatenate([x * SIGNAL_UNIT_T, trig]), info, verbose=False)
    bids_path = mne_bids.BIDSPath(subject=f"BIGMEG{subject}", session=f"{ses:02d}", task="main", run=f"{run:02d}",
                                  datatype="meg", root=tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mne-bids warns about the missing events and digitization
        mne_bids.write_raw_bids(raw, bids_path, format="FIF", allow_preload=True, overwrite=True, verbose=False)
    events = pd.DataFrame({
        "onset": onsets / sf,
        "duration": p["image_duration"],
        "trial_type": run_trials.trial_type.to_numpy(),
        "things_category_nr": run_trials.things_category_nr.to_numpy(),
        "value": run_trials.value.to_numpy(),
        "sample": onsets,
    })
    events.to_csv(bids_path.copy().update(suffix="events", extension=".tsv").fpath, sep="\t", index=False,
                  na_rep="n/a", float_format="%.6f")
    return raw


def _derivative_epochs(raw, channels: list[str], onsets: np.ndarray, trial_types: pd.Series, p: dict):
    """One run in the published derivative's conventions: band-pass, epoch, resample, baseline z-score."""
    import mne

    filt = raw.copy().pick(channels).filter(p["derivative_l_freq"], p["derivative_h_freq"], verbose="error")
    events = np.column_stack([onsets, np.zeros_like(onsets), [EPOCH_CODES[t] for t in trial_types]])
    ep = mne.Epochs(filt, events, tmin=p["derivative_tmin"], tmax=p["derivative_tmax"], baseline=None, preload=True,
                    reject_by_annotation=False, event_repeated="error", verbose=False)
    if len(ep) != len(onsets):
        raise RuntimeError(f"simulation bug: {len(onsets) - len(ep)} derivative epochs dropped")
    if ep.info["sfreq"] != p["derivative_sfreq"]:
        ep.resample(p["derivative_sfreq"], verbose=False)
    data = mne.baseline.rescale(ep.get_data(), ep.times, (None, 0.0), mode="zscore", copy=True, verbose=False)
    return data, events, ep.info


def _write_derivative(path: Path, runs: list, p: dict) -> None:
    """Concatenate the runs' epochs (trial order), drop MRO11-1609 and save as split FIF files."""
    import mne

    events = np.concatenate([ev for _, ev, _ in runs])
    events[:, 0] = np.arange(len(events)) * int(np.ceil(p["soa"] * p["derivative_sfreq"]))  # unique sample numbers
    epochs = mne.EpochsArray(np.concatenate([d for d, _, _ in runs]), runs[0][2], events=events,
                             tmin=p["derivative_tmin"], event_id=EPOCH_CODES, baseline=None, verbose=False)
    epochs.drop_channels([DROPPED_IN_DERIVATIVE])
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs.save(path, split_size=p["derivative_split_size"], overwrite=True, verbose=False)


def run_simulate_things_meg(root: str | os.PathLike, stimulus_table: str | os.PathLike,
                            features_dir: str | os.PathLike, layers: Sequence[str], params: dict | None,
                            seed: int) -> None:
    """Rule entry point: simulate THINGS-MEG from a feature folder of the model side.

    Reads ``{features_dir}/{layer}.forward.npy`` and ``{layer}.backprop.npy`` for each of
    ``layers`` (ordered by depth) and ``{features_dir}/index.parquet`` (``image_id`` of
    each row), then calls :func:`simulate_things_meg` (overwriting ``root``).
    """
    features_dir = Path(features_dir)
    index = features_dir / "index.parquet"
    if not index.exists():
        raise FileNotFoundError(f"{index} does not exist: expected the feature index (one image_id per row)")
    ids = pd.read_parquet(index).image_id.astype(str).tolist()
    arrays = {}
    for signal in SIGNALS:
        arrays[signal] = []
        for layer in layers:
            path = features_dir / f"{layer}.{signal}.npy"
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: expected {signal} features of layer {layer!r}")
            arrays[signal].append(np.load(path, mmap_mode="r"))
    simulate_things_meg(root, stimulus_table, arrays["forward"], arrays["backprop"], ids, params, seed,
                        overwrite=True)


def toy_stimulus_table(n_concepts: int = 8, images_per_concept: int = 4, n_test: int = 4) -> pd.DataFrame:
    """A THINGS-style stimulus table without images, for trying the simulator and loaders.

    Concepts ``concept_00`` ... (every third one ``ice_cream_NN``, with an underscore, like
    THINGS), training images ``images_meg/<c>/<c>_NNb.jpg`` and, for the first ``n_test``
    concepts, one test image ``images_test_meg/<c>_NNs.jpg``.

    Returns
    -------
    table : DataFrame
        Columns ``image_id, dataset, source, hdf5_row, concept, caption, split``.
    """
    rows = []
    concepts = [f"ice_cream_{i:02d}" if i % 3 == 0 else f"concept_{i:02d}" for i in range(n_concepts)]
    for c in concepts:
        for k in range(1, images_per_concept + 1):
            rows.append((f"{c}_{k:02d}b", "things", f"images_meg/{c}/{c}_{k:02d}b.jpg", -1, c, f"a {c}", "train"))
    for c in concepts[:n_test]:
        k = images_per_concept + 1
        rows.append((f"{c}_{k:02d}s", "things", f"images_test_meg/{c}_{k:02d}s.jpg", -1, c, f"a {c}", "test"))
    return pd.DataFrame(rows, columns=["image_id", "dataset", "source", "hdf5_row", "concept", "caption", "split"])


def toy_features(n_images: int, n_layers: int, dim: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Independent Gaussian forward and backprop features (L arrays of (n_images, dim), float32)."""
    rng = np.random.default_rng([seed, 60])
    forward = [rng.standard_normal((n_images, dim), dtype=np.float32) for _ in range(n_layers)]
    backprop = [rng.standard_normal((n_images, dim), dtype=np.float32) for _ in range(n_layers)]
    return forward, backprop
