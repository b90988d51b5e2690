"""THINGS-MEG loaders and preprocessing (Hebart et al. 2023; OpenNeuro ds004212).

Two sources, one output format (``source`` below):

``"raw"``
    The BIDS tree ``sub-BIGMEG{n}/ses-NN/meg/sub-BIGMEG{n}_ses-NN_task-main_run-NN_meg.{ds,fif}``
    with its ``_events.tsv``. Runs are processed one at a time (memory): read with
    mne-bids; take each image's onset from the ``UPPT001`` trigger channel (value 64 per
    image; ``onset: trigger``, neuralset, the paper's pipeline) or from the events file's
    photodiode-corrected ``sample`` column (``onset: sample``, the dataset authors'
    ``MEG/step1_preprocessing.py``); keep the MEG sensors minus ``exclude_channels``
    (CTF axial gradiometers are type ``mag``); band-pass the continuous run
    (``raw.filter(l_freq, h_freq)``), resample the continuous run to ``sfreq``
    (``raw.resample(sfreq, events=...)``, FFT over the whole run, onsets rounded to the new
    grid), then epoch ``tmin..tmax``. Events rows are aligned with the rows of
    ``sourcedata/sample_attributes_P{n}.csv`` of the same session and run, in order; the
    image comes from the sample attributes, and disagreements with the events ``value``
    are counted per run (at most ``max_mismatches``).
``"derivative"``
    ``derivatives/preprocessed/preprocessed_P{n}-epo.fif`` (splits followed by MNE) with
    ``sourcedata/sample_attributes_P{n}.csv`` giving, row by row, each epoch's image.
    These epochs are already 0.1-40 Hz, -0.1..1.3 s, 200 Hz, baseline z-scored: what still
    applies is done (low-pass at ``h_freq``, resample to ``sfreq``, crop to the part of
    ``tmin..tmax`` that exists). The paper's -0.5..3 s window is *not* available from
    the derivative; the output then spans -0.1..~1.27 s (a warning says so).

Then, for both: catch trials dropped (count reported), repeated presentations of an
image averaged (``repeats: average``; or ``first``), optional baseline correction, and
a z-score across images for each channel and time point (``zscore``).

Output of :func:`prepare_meg_subject` (one subject):

* ``out_data``: ``.npy`` float32, shape (n_images, n_channels, n_times), rows in
  ``image_id`` order (sorted), the order of the table;
* ``out_table``: Parquet, one row per image: ``image_id, dataset, source, concept, split,
  things_image_nr, things_category_nr, n_averaged, subject``; its schema metadata key
  ``brainprop_meg`` holds JSON with ``times``, ``channels``, ``sfreq``, the counts and the
  parameters (read it with :func:`read_meg_table`);
* ``out_times``: ``.npy`` float64, shape (n_times,), seconds relative to image onset;
* ``out_mismatches``: Parquet, one row per run: events/attributes mismatches and the
  trigger-to-``sample`` offsets (:data:`RUN_COLUMNS`).

Every input problem raises before anything is written, naming the file and what
was expected; outputs are written atomically.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from brainprop.brain.align import align_to_stimuli
from brainprop.stimuli import things_database_path
from brainprop.utils import atomic_output, get_logger, merge_params, save_npy_atomic, save_parquet_atomic

log = get_logger(__name__)

__all__ = [
    "DEFAULT_PARAMS",
    "resolve_params",
    "image_fields",
    "find_meg_runs",
    "read_events_tsv",
    "read_sample_attributes",
    "align_events",
    "collect_trials",
    "read_meg_run",
    "run_onsets",
    "preprocess_raw_run",
    "preprocess_epochs",
    "zscore_images",
    "MEGSubject",
    "load_meg_subject",
    "prepare_meg_subject",
    "write_meg_table",
    "read_meg_table",
]

SOURCES = ("raw", "derivative")
ONSETS = ("trigger", "sample")
TRIAL_TYPES = {"exp": "train", "test": "test", "catch": None}
IMAGE_DIRS = {"images_meg": "train", "images_test_meg": "test", "images_catch_meg": "catch"}
META_KEY = b"brainprop_meg"
TRIGGER_CHANNEL = "UPPT001"
IMAGE_TRIGGER = 64  # UPPT001 value at every image onset (a final 32 ends the run)
RUN_COLUMNS = ["subject", "session_nr", "run_nr", "n_trials", "n_mismatches", "trigger_lead_median_s",
               "trigger_lead_min_s", "trigger_lead_max_s"]

DEFAULT_PARAMS: dict = {
    "task": "main",  # BIDS task label of the runs
    "sessions": None,  # 1-based sessions to use (None: all found); a listed missing session is an error
    "runs": None,  # 1-based runs per session (None: all listed in scans.tsv); a listed missing run is an error
    "onset": "trigger",  # raw source: image onsets from the UPPT001 trigger (neuralset) or events.tsv "sample"
    "max_mismatches": 20,  # raw source: most events rows per run whose value/trial type disagree with the attributes
    "l_freq": 0.1,  # high-pass (Hz) of the continuous runs (derivative: must not exceed its 0.1 Hz)
    "h_freq": 20.0,  # low-pass (Hz)
    "sfreq": 30.0,  # output sampling rate (Hz): raw: continuous raw.resample before epoching; derivative: per epoch
    "tmin": -0.5,  # epoch start (s from image onset); derivative: cropped to what exists
    "tmax": 3.0,  # epoch end (s); derivative: cropped to what exists
    "baseline": None,  # [start, stop] (s): mean removal per epoch after resampling; None: none (paper)
    "repeats": "average",  # "average" the presentations of an image, or keep the "first"
    "zscore": True,  # z-score across images per channel and time point (paper)
    "exclude_channels": ["MRO11-1609"],  # sensors to drop (the dataset authors' malfunctioning sensor)
    "missing_images": "error",  # "error" if a MEG image is absent from the stimulus table, or "drop" it
    "chunk_size": 1000,  # derivative epochs read and processed at a time (memory)
}


def resolve_params(params: dict | None) -> dict:
    """Return :data:`DEFAULT_PARAMS` updated with ``params``; unknown keys or bad values raise ``ValueError``."""
    p = merge_params(DEFAULT_PARAMS, params, "MEG preprocessing")
    if p["repeats"] not in ("average", "first"):
        raise ValueError(f"MEG parameter 'repeats' must be 'average' or 'first', got {p['repeats']!r}")
    if p["missing_images"] not in ("error", "drop"):
        raise ValueError(f"MEG parameter 'missing_images' must be 'error' or 'drop', got {p['missing_images']!r}")
    if p["onset"] not in ONSETS:
        raise ValueError(f"MEG parameter 'onset' must be one of {ONSETS}, got {p['onset']!r}")
    if not int(p["max_mismatches"]) >= 0:
        raise ValueError(f"MEG parameter 'max_mismatches' must be >= 0, got {p['max_mismatches']}")
    if not p["tmin"] < p["tmax"]:
        raise ValueError(f"MEG parameters need tmin < tmax, got {p['tmin']} and {p['tmax']}")
    if p["baseline"] is not None and len(p["baseline"]) != 2:
        raise ValueError(f"MEG parameter 'baseline' must be null or [start, stop] (s), got {p['baseline']}")
    return p


def _subject_label(subject: int | str) -> str:
    return f"BIGMEG{int(subject)}"


# ----------------------------------------------------------------------------- metadata


def image_fields(image_path: str, where: str | os.PathLike) -> tuple[str, str, str, str]:
    """Split a THINGS image path into (relative path, image_id, concept, kind).

    ``image_path`` may carry any prefix before ``images_meg/``, ``images_test_meg/`` or
    ``images_catch_meg/``; the returned path starts there (the stimulus table's ``source``
    convention). ``kind`` is ``"train"``, ``"test"`` or ``"catch"``; the concept is the
    file stem before its last underscore (THINGS concepts contain underscores).

    Raises
    ------
    ValueError
        Naming ``where`` (the metadata file) when the path has none of those forms.
    """
    parts = str(image_path).replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part in IMAGE_DIRS:
            rel = "/".join(parts[i:])
            stem = Path(parts[-1]).stem
            kind = IMAGE_DIRS[part]
            if kind == "catch":
                return rel, stem, "", kind
            if "_" not in stem:
                break
            return rel, stem, stem.rsplit("_", 1)[0], kind
    raise ValueError(f"{where}: image path {image_path!r} is not a THINGS path (expected "
                     "images_meg/<concept>/<concept>_NN<letter>.jpg, images_test_meg/<concept>_NN<letter>.jpg "
                     "or images_catch_meg/catchNNN.jpg)")


def find_meg_runs(root: str | os.PathLike, subject: int, task: str = "main", sessions=None,
                  runs=None) -> pd.DataFrame:
    """List the raw runs of one subject.

    Runs come from each session's ``sub-BIGMEG{n}_ses-NN_scans.tsv`` when present (every
    listed run of ``task`` must exist), else from the files in ``ses-NN/meg``. Sessions
    and runs named in the configuration (1-based numbers) must all be present.

    Returns
    -------
    runs : DataFrame
        One row per run, sorted: ``session_nr, run_nr`` (int), ``raw_path``,
        ``events_path``, ``session``, ``run`` (BIDS labels).

    Raises
    ------
    FileNotFoundError
        Naming the missing subject/session folder, listed run, expected run or events file.
    """
    root = Path(root)
    sub = _subject_label(subject)
    sub_dir = root / f"sub-{sub}"
    if not sub_dir.is_dir():
        raise FileNotFoundError(f"{sub_dir} does not exist: expected the raw BIDS folder sub-{sub} of THINGS-MEG "
                                f"under {root}")
    ses_dirs = {int(d.name[4:]): d for d in sorted(sub_dir.glob("ses-*")) if d.is_dir() and d.name[4:].isdigit()}
    if sessions is not None:
        missing = [s for s in sessions if int(s) not in ses_dirs]
        if missing:
            raise FileNotFoundError(f"{sub_dir}: session(s) {missing} expected by the configuration are missing "
                                    f"(found {sorted(ses_dirs)})")
        ses_dirs = {int(s): ses_dirs[int(s)] for s in sessions}
    if not ses_dirs:
        raise FileNotFoundError(f"{sub_dir} has no ses-NN folders")
    pattern = re.compile(rf"sub-{sub}_ses-(\w+?)_task-{re.escape(task)}_run-(\d+)_meg\.(ds|fif)$")
    rows = []
    for ses_nr, ses_dir in sorted(ses_dirs.items()):
        scans = ses_dir / f"sub-{sub}_{ses_dir.name}_scans.tsv"
        if scans.exists():
            listed = pd.read_csv(scans, sep="\t")
            if "filename" not in listed.columns:
                raise ValueError(f"{scans} has no 'filename' column (BIDS scans.tsv)")
            paths = [ses_dir / f for f in listed.filename if pattern.search(Path(f).name)]
            absent = [str(p) for p in paths if not p.exists()]
            if absent:
                raise FileNotFoundError(f"run(s) listed in {scans} are missing: {absent}")
        else:
            paths = sorted(p for p in (ses_dir / "meg").glob(f"sub-{sub}_*_meg.*") if pattern.search(p.name))
        found = {}
        for path in paths:
            m = pattern.search(path.name)
            found[int(m.group(2))] = path
        if runs is not None:
            missing = [r for r in runs if int(r) not in found]
            if missing:
                raise FileNotFoundError(f"{ses_dir}/meg: run(s) {missing} of task {task!r} expected by the "
                                        f"configuration are missing (found {sorted(found)})")
            found = {int(r): found[int(r)] for r in runs}
        for run_nr, path in sorted(found.items()):
            events = path.with_name(re.sub(r"_meg\.(ds|fif)$", "_events.tsv", path.name))
            if not events.exists():
                raise FileNotFoundError(f"{events} is missing: every run needs its events.tsv "
                                        "(onset, trial_type, value)")
            m = pattern.search(path.name)
            rows.append((ses_nr, run_nr, path, events, ses_dir.name[4:], m.group(2)))
    if not rows:
        raise FileNotFoundError(f"no task-{task} runs found under {sub_dir}")
    return pd.DataFrame(rows, columns=["session_nr", "run_nr", "raw_path", "events_path", "session", "run"])


def _numeric(series: pd.Series, where, column: str) -> pd.Series:
    out = pd.to_numeric(series, errors="coerce")
    bad = out.isna() & series.notna()
    if bad.any():
        raise ValueError(f"{where}: column {column!r} has non-numeric values, e.g. {list(series[bad][:5])}")
    return out


def read_events_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate one THINGS-MEG ``_events.tsv``.

    Returns
    -------
    events : DataFrame
        ``onset`` (s, float), ``trial_type`` (exp|test|catch), ``value`` (Int64, the
        events file's image number; NA for catch), ``things_category_nr`` (Int64 or NA),
        ``sample`` (float or NaN), in file order. ``value`` is *not* trusted for the image:
        :func:`collect_trials` takes it from the sample attributes.

    Raises
    ------
    ValueError
        Naming ``path``: no ``onset``/``trial_type``/``value`` column, unknown trial
        types, or n/a onsets on exp/test trials.
    """
    path = Path(path)
    ev = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN", ""], keep_default_na=False)
    expected = "onset, duration, trial_type, things_category_nr, value, sample"
    for col in ("onset", "trial_type"):
        if col not in ev.columns:
            raise ValueError(f"{path}: events.tsv has no {col!r} column (expected columns {expected})")
    nr_col = "value" if "value" in ev.columns else "things_image_nr" if "things_image_nr" in ev.columns else None
    if nr_col is None:
        raise ValueError(f"{path}: events.tsv has no 'value' (things_image_nr) column (expected columns {expected})")
    ttype = ev.trial_type.astype(str).str.strip()
    unknown = sorted(set(ttype) - set(TRIAL_TYPES))
    if unknown:
        raise ValueError(f"{path}: unknown trial_type value(s) {unknown} (expected exp, test or catch)")
    out = pd.DataFrame({
        "onset": _numeric(ev.onset, path, "onset").astype(float),
        "trial_type": ttype,
        "value": _numeric(ev[nr_col], path, nr_col).round().astype("Int64"),
        "things_category_nr": (_numeric(ev.things_category_nr, path, "things_category_nr").round().astype("Int64")
                               if "things_category_nr" in ev.columns else pd.array([pd.NA] * len(ev), "Int64")),
        "sample": _numeric(ev["sample"], path, "sample").astype(float) if "sample" in ev.columns else np.nan,
    })
    bad = (out.trial_type != "catch") & out.onset.isna()
    if bad.any():  # an n/a value is only a mismatch with the attributes; an n/a onset cannot be epoched
        raise ValueError(f"{path}: {int(bad.sum())} exp/test trial(s) have n/a onsets, first at row(s) "
                         f"{list(np.flatnonzero(bad)[:5] + 1)}; every exp/test trial needs an onset")
    return out


def read_sample_attributes(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``sourcedata/sample_attributes_P{n}.csv`` (one row per trial, epoch order).

    Returns
    -------
    attrs : DataFrame
        ``trial_type, session_nr, run_nr, things_image_nr, things_category_nr`` (Int64,
        1-based, NA for catch), ``image_path`` and the derived ``source, image_id,
        concept, split`` (NA for catch).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``path``: missing file or columns, unknown trial types, exp/test rows
        without image path or number, a path whose folder contradicts the trial type.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected THINGS-MEG sample attributes "
                                "(sourcedata/sample_attributes_P{n}.csv)")
    attrs = pd.read_csv(path, na_values=["n/a", "N/A", "NaN", ""], keep_default_na=False)
    required = ["trial_type", "session_nr", "run_nr", "things_image_nr", "image_path"]
    missing = [c for c in required if c not in attrs.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (expected {required} and things_category_nr)")
    attrs = attrs.copy()
    attrs["trial_type"] = attrs.trial_type.astype(str).str.strip()
    unknown = sorted(set(attrs.trial_type) - set(TRIAL_TYPES))
    if unknown:
        raise ValueError(f"{path}: unknown trial_type value(s) {unknown} (expected exp, test or catch)")
    for col in ("session_nr", "run_nr", "things_image_nr", "things_category_nr"):
        if col in attrs.columns:
            attrs[col] = _numeric(attrs[col], path, col).round().astype("Int64")
        else:
            attrs[col] = pd.array([pd.NA] * len(attrs), "Int64")
    shown = attrs.trial_type != "catch"
    for col in ("image_path", "things_image_nr"):
        bad = shown & attrs[col].isna()
        if bad.any():
            raise ValueError(f"{path}: {int(bad.sum())} exp/test row(s) have n/a {col}, first at data row(s) "
                             f"{list(np.flatnonzero(bad)[:5] + 1)}")
    fields = pd.DataFrame([image_fields(p, path) if s else (None,) * 4 for p, s in zip(attrs.image_path, shown)],
                          columns=["source", "image_id", "concept", "kind"], index=attrs.index, dtype=object)
    attrs[["source", "image_id", "concept"]] = fields[["source", "image_id", "concept"]]
    attrs["split"] = attrs.trial_type.map(TRIAL_TYPES)
    wrong = shown & (fields.kind != attrs.split)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"{path}: row {i + 1} has trial_type {attrs.trial_type.iloc[i]!r} but image path "
                         f"{attrs.image_path.iloc[i]!r} (exp -> images_meg/, test -> images_test_meg/)")
    return attrs


def align_events(events: pd.DataFrame, attrs: pd.DataFrame, where: str, max_mismatches: int) -> pd.DataFrame:
    """Align one run's events rows with its sample-attributes rows, in order, and take the image from the latter.

    The events ``value`` and the attributes' ``things_image_nr`` disagree on some trials of
    the real data (neuralset tolerates up to 20 per run); a row whose ``value`` or
    ``trial_type`` differs from the attributes (NA-aware) counts as a mismatch.

    Parameters
    ----------
    events : DataFrame, one run of :func:`read_events_tsv` (n_rows rows, file order)
    attrs : DataFrame, the :func:`read_sample_attributes` rows of the same session and run, in order
    where : str
        Names the run in errors (events file, session, run).
    max_mismatches : int

    Returns
    -------
    trials : DataFrame, n_rows rows
        The events columns (``onset, sample, value``), ``event_order`` (rank of the onset
        in the run, 0-based), ``mismatch`` (bool), and from the attributes ``trial_type,
        things_image_nr, things_category_nr, source, image_id, concept, split``.

    Raises
    ------
    ValueError
        Naming ``where``: row counts differ, or more than ``max_mismatches`` mismatches.
    """
    if len(events) != len(attrs):
        raise ValueError(f"{where}: {len(events)} events rows but {len(attrs)} sample-attributes rows for this "
                         "session and run; they must correspond row by row")
    a = events.value.to_numpy(dtype=float, na_value=np.nan)
    b = attrs.things_image_nr.to_numpy(dtype=float, na_value=np.nan)
    same_nr = (a == b) | (np.isnan(a) & np.isnan(b))
    mismatch = ~same_nr | (events.trial_type.to_numpy() != attrs.trial_type.to_numpy())
    if mismatch.sum() > max_mismatches:
        rows = list(np.flatnonzero(mismatch)[:5] + 1)
        raise ValueError(f"{where}: {int(mismatch.sum())} events rows disagree with the sample attributes "
                         f"(value vs things_image_nr, or trial_type), more than max_mismatches={max_mismatches} "
                         f"(first at row(s) {rows}): are the events and attributes of the same run?")
    out = events[["onset", "sample", "value"]].reset_index(drop=True)
    out["event_order"] = np.argsort(np.argsort(events.onset.to_numpy(), kind="stable"), kind="stable")
    out["mismatch"] = mismatch
    cols = ["trial_type", "things_image_nr", "things_category_nr", "source", "image_id", "concept", "split"]
    return pd.concat([out, attrs[cols].reset_index(drop=True)], axis=1)


def collect_trials(root: str | os.PathLike, subject: int, source: str, params: dict | None = None) -> pd.DataFrame:
    """Every trial of one subject with its image, validated, before any MEG data is read.

    Returns
    -------
    trials : DataFrame
        One row per trial (catch included), in recording order: ``session_nr, run_nr,
        trial_type, source, image_id, concept, split, things_image_nr,
        things_category_nr``, plus for ``source="raw"`` the :func:`align_events` columns
        (``onset, sample, value, event_order, mismatch``), ``n_run_events``, ``raw_path``,
        ``events_path``, and for ``source="derivative"`` ``epoch`` (row in the epochs file),
        ``epochs_path``; ``meta_path`` names the metadata file each row came from.
    """
    p = resolve_params(params)
    root = Path(root)
    if source not in SOURCES:
        raise ValueError(f"MEG source must be one of {SOURCES}, got {source!r}")
    attrs_path = root / "sourcedata" / f"sample_attributes_P{int(subject)}.csv"
    runs = find_meg_runs(root, subject, p["task"], p["sessions"], p["runs"]) if source == "raw" else None
    attrs = read_sample_attributes(attrs_path)
    if source == "derivative":
        epochs_path = root / "derivatives" / "preprocessed" / f"preprocessed_P{int(subject)}-epo.fif"
        if not epochs_path.exists():
            raise FileNotFoundError(f"{epochs_path} does not exist: expected the THINGS-MEG preprocessed epochs "
                                    "(derivatives/preprocessed/preprocessed_P{n}-epo.fif)")
        trials = attrs.assign(epoch=np.arange(len(attrs)), epochs_path=str(epochs_path), meta_path=str(attrs_path))
        for col, wanted in (("session_nr", p["sessions"]), ("run_nr", p["runs"])):
            if wanted is not None:
                absent = sorted(set(int(w) for w in wanted) - set(trials[col].dropna().astype(int)))
                if absent:
                    raise ValueError(f"{attrs_path}: {col} {absent} expected by the configuration have no trials")
                trials = trials[trials[col].isin([int(w) for w in wanted])]
        trials = trials.drop(columns=["image_path"]).reset_index(drop=True)
        trials.attrs["n_epochs_expected"] = len(attrs)
        return trials
    parts = []
    for run in runs.itertuples():
        where = f"{run.events_path} (session {run.session_nr}, run {run.run_nr}; attributes {attrs_path})"
        run_attrs = attrs[(attrs.session_nr == run.session_nr) & (attrs.run_nr == run.run_nr)]
        part = align_events(read_events_tsv(run.events_path), run_attrs, where, int(p["max_mismatches"]))
        if part.mismatch.any():
            log.info("%s: %d of %d events rows disagree with the sample attributes; images taken from the "
                     "attributes", run.events_path, int(part.mismatch.sum()), len(part))
        part = part.assign(session_nr=run.session_nr, run_nr=run.run_nr, n_run_events=len(part),
                           raw_path=str(run.raw_path), events_path=str(run.events_path),
                           meta_path=str(run.events_path), session=run.session, run=run.run)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- MEG data


def _read_fif_guarded(path: Path, reader, what: str):
    """Call ``reader()``; turn MNE's errors and truncation warnings into a ValueError naming ``path``."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=r".*([Tt]runcat|Invalid tag|beyond the end).*")
            return reader()
    except MemoryError:
        raise
    except FileNotFoundError as err:  # e.g. a split file of the epochs is missing
        raise FileNotFoundError(f"{path}: could not read {what}: a file it needs is missing: {err}") from err
    except Exception as err:  # MNE raises many types on corrupt files
        raise ValueError(f"{path}: could not read {what} (expected a complete, readable file; "
                         f"is it truncated or corrupt?): {type(err).__name__}: {err}") from err


def read_meg_run(raw_path: str | os.PathLike, root: str | os.PathLike | None = None):
    """Read one raw BIDS run (CTF ``.ds`` or FIF) with mne-bids, data loaded.

    The recording length is checked against ``RecordingDuration`` in the run's
    ``_meg.json`` when present (a truncated file fails here).

    Returns
    -------
    raw : mne.io.Raw

    Raises
    ------
    ValueError
        Naming ``raw_path`` when the file cannot be read or is shorter than its sidecar says.
    """
    import mne_bids

    raw_path = Path(raw_path)
    if not raw_path.exists():
        raise FileNotFoundError(f"{raw_path} does not exist")

    def reader():
        bids_path = mne_bids.get_bids_path_from_fname(raw_path)
        if root is not None:
            bids_path.update(root=root)
        raw = mne_bids.read_raw_bids(bids_path, verbose="error")
        raw.load_data(verbose="error")
        return raw

    raw = _read_fif_guarded(raw_path, reader, "the MEG recording")
    sidecar = raw_path.with_name(re.sub(r"_meg\.(ds|fif)$", "_meg.json", raw_path.name))
    if sidecar.exists():
        duration = json.loads(sidecar.read_text()).get("RecordingDuration")
        if isinstance(duration, (int, float)):
            have = raw.n_times / raw.info["sfreq"]
            if have < duration - 2.0 / raw.info["sfreq"]:
                raise ValueError(f"{raw_path}: recording holds {have:.3f} s but {sidecar.name} says "
                                 f"RecordingDuration={duration} s (truncated file?)")
    return raw


def _meg_channels(info, exclude: list[str], where) -> list[str]:
    import mne

    picks = mne.pick_types(info, meg="mag", ref_meg=False, exclude=[])
    names = [info["ch_names"][i] for i in picks]
    if not names:
        raise ValueError(f"{where}: no MEG sensors (type 'mag') found")
    absent = sorted(set(exclude) - set(names))
    if absent:
        log.info("%s: channels to exclude %s are not present (the derivative has dropped MRO11-1609)", where, absent)
    return [n for n in names if n not in set(exclude)]


def preprocess_raw_run(raw, samples: np.ndarray, params: dict | None = None):
    """Filter and resample one continuous run, then epoch it at ``samples``.

    Steps (MNE defaults otherwise): pick MEG sensors minus ``exclude_channels``;
    ``raw.filter(l_freq, h_freq)``; ``raw.resample(sfreq, events=...)`` on the continuous
    run (FFT over the whole run: no per-epoch edge effects; each onset is rounded to the
    nearest sample of the new grid, at most half a sample, 16.7 ms at 30 Hz); then
    ``mne.Epochs(tmin, tmax, baseline=None, reject_by_annotation=False)``.
    ``raw`` is modified in place (picked, filtered, resampled).

    Parameters
    ----------
    raw : mne.io.Raw
        One run, data loaded.
    samples : ndarray of int, shape (n_trials,)
        Image onsets as MNE event samples of ``raw`` (``first_samp`` included).
    params : dict

    Returns
    -------
    data : ndarray, shape (n_kept, n_channels, n_times), float64
        Epochs kept (those that fit in the recording), in trial order; MEG units (T).
    times : ndarray, shape (n_times,)
        Seconds relative to onset.
    channels : list of str
    kept : ndarray of int, shape (n_kept,)
        Index into ``samples`` of each kept epoch.
    """
    import mne

    p = resolve_params(params)
    where = raw.filenames[0] if raw.filenames and raw.filenames[0] else "raw"
    raw.pick(_meg_channels(raw.info, p["exclude_channels"], where))
    raw.filter(p["l_freq"], p["h_freq"], verbose="warning")
    samples = np.asarray(samples, dtype=np.int64)
    events = np.column_stack([samples, np.zeros_like(samples), np.arange(1, len(samples) + 1)])
    if raw.info["sfreq"] != p["sfreq"]:
        raw, events = raw.resample(p["sfreq"], events=events, verbose="error")
    epochs = mne.Epochs(raw, events, tmin=p["tmin"], tmax=p["tmax"], baseline=None, preload=True,
                        reject_by_annotation=False, event_repeated="error", verbose="error")
    return epochs.get_data(), epochs.times.copy(), list(epochs.ch_names), np.asarray(epochs.selection)


def preprocess_epochs(epochs, params: dict | None = None):
    """Apply what still applies to already-epoched data (the derivative): low-pass, resample, crop.

    Low-pass at ``h_freq`` only if ``epochs.info['lowpass']`` is higher; resample to
    ``sfreq`` if different; crop to ``[max(tmin, epochs.tmin), min(tmax, epochs.tmax)]``.
    A high-pass is never applied to short epochs: if ``l_freq`` exceeds the data's
    high-pass a ValueError says to use the raw source. ``epochs`` is modified in place.

    Parameters
    ----------
    epochs : mne.Epochs or mne.EpochsArray, data loaded

    Returns
    -------
    data : ndarray, shape (n_epochs, n_channels, n_times), float64
    times : ndarray, shape (n_times,)
    """
    p = resolve_params(params)
    hp, lp = float(epochs.info["highpass"]), float(epochs.info["lowpass"])
    if p["l_freq"] is not None and p["l_freq"] > hp + 1e-6:
        raise ValueError(f"the epochs are high-passed at {hp} Hz; a {p['l_freq']} Hz high-pass cannot be applied "
                         "to short epochs (use the raw source, or set l_freq <= the data's high-pass)")
    if p["h_freq"] is not None and p["h_freq"] < lp - 1e-6:
        epochs.filter(None, p["h_freq"], verbose="error")
    if epochs.info["sfreq"] != p["sfreq"]:
        epochs.resample(p["sfreq"], verbose="error")
    tmin, tmax = max(p["tmin"], epochs.tmin), min(p["tmax"], epochs.tmax)
    if tmin >= tmax:
        raise ValueError(f"requested window {p['tmin']}..{p['tmax']} s does not overlap the epochs "
                         f"({epochs.tmin}..{epochs.tmax} s)")
    epochs.crop(tmin, tmax)
    return epochs.get_data(), epochs.times.copy()


def zscore_images(data: np.ndarray) -> np.ndarray:
    """Z-score across images for each channel and time point (in place when float64).

    ``(x - mean_images) / std_images`` with ddof=0; a (channel, time) that is constant
    across images becomes 0 (logged).

    Parameters
    ----------
    data : ndarray, shape (n_images, n_channels, n_times)

    Returns
    -------
    z : ndarray, same shape, float64
    """
    data = np.asarray(data, dtype=np.float64)
    mean = data.mean(axis=0)
    std = data.std(axis=0)
    flat = std == 0
    if flat.any():
        log.warning("z-score: %d (channel, time) points are constant across images; set to 0", int(flat.sum()))
    data -= mean
    data /= np.where(flat, 1.0, std)
    return data


def _apply_baseline(data: np.ndarray, times: np.ndarray, baseline) -> np.ndarray:
    if baseline is None:
        return data
    from mne.baseline import rescale

    return rescale(data, times, tuple(baseline), mode="mean", copy=False, verbose="error")


class _ImageAccumulator:
    """Running per-image sums of epochs (float64), averaging repeats or keeping the first."""

    def __init__(self, image_ids: list[str], mode: str):
        self.index = {im: i for i, im in enumerate(image_ids)}
        self.mode = mode
        self.sums = None
        self.counts = np.zeros(len(image_ids), dtype=np.int64)

    def add(self, image_ids, data: np.ndarray) -> None:
        if self.sums is None:
            self.sums = np.zeros((len(self.counts),) + data.shape[1:], dtype=np.float64)
        for im, x in zip(image_ids, data):
            i = self.index[im]
            if self.mode == "first" and self.counts[i]:
                continue
            self.sums[i] += x
            self.counts[i] += 1

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        keep = self.counts > 0
        sums = self.sums[keep]
        sums /= self.counts[keep][:, None, None]
        return sums, keep


@dataclass
class MEGSubject:
    """One subject's prepared THINGS-MEG data.

    Attributes
    ----------
    data : ndarray, shape (n_images, n_channels, n_times), float32
    table : DataFrame, one row per image (same order as ``data``)
    times : ndarray, shape (n_times,), seconds
    channels : list of str
    report : dict (counts, sampling rate, parameters)
    runs : DataFrame, one row per run (:data:`RUN_COLUMNS`): events/attributes mismatches and
        trigger-to-``sample`` offsets (NA where not measured: derivative source, or no ``sample``)
    """

    data: np.ndarray
    table: pd.DataFrame
    times: np.ndarray
    channels: list[str]
    report: dict = field(default_factory=dict)
    runs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RUN_COLUMNS))


def _image_table(trials: pd.DataFrame, subject: int) -> pd.DataFrame:
    shown = trials[trials.trial_type != "catch"]
    table = (shown.groupby("image_id", sort=True)
             .agg(source=("source", "first"), concept=("concept", "first"), split=("split", "first"),
                  things_image_nr=("things_image_nr", "first"), things_category_nr=("things_category_nr", "first"),
                  n_sources=("source", "nunique"))
             .reset_index())
    clash = table[table.n_sources > 1]
    if len(clash):
        raise ValueError(f"{shown.meta_path.iloc[0]}: image id(s) {list(clash.image_id[:5])} appear with different "
                         "image paths (e.g. both as training and test image)")
    table.insert(1, "dataset", "things")
    table["subject"] = int(subject)
    for col in ("image_id", "dataset", "source", "concept", "split"):
        table[col] = table[col].astype(str)
    return table.drop(columns="n_sources")


def _check_stimuli(table: pd.DataFrame, trials: pd.DataFrame, stimulus_table, missing_images: str) -> pd.DataFrame:
    """Keep MEG images of the stimulus table (error or drop others); check paths agree."""
    if stimulus_table is None:
        return table
    where = stimulus_table if not isinstance(stimulus_table, pd.DataFrame) else "stimulus table"
    stim = pd.read_parquet(stimulus_table) if not isinstance(stimulus_table, pd.DataFrame) else stimulus_table
    meta_files = sorted(set(trials.meta_path))
    meta = meta_files[0] if len(meta_files) == 1 else f"{meta_files[0]} (and {len(meta_files) - 1} more)"
    absent = ~table.image_id.isin(stim.image_id.astype(str))
    if absent.any() and missing_images == "drop":
        log.warning("dropping %d MEG images absent from %s, e.g. %s", int(absent.sum()), where,
                    list(table.image_id[absent][:5]))
        table = table[~absent].reset_index(drop=True)
    try:
        aligned = align_to_stimuli(table[["image_id"]], stim)
    except ValueError as err:
        raise ValueError(f"{meta}: {err} ({where}); set missing_images: drop to skip them") from err
    if "source" in stim.columns:
        stim_source = stim.source.astype(str).to_numpy()[aligned.stimulus_row.to_numpy()]
        # the stimulus table may point at the THINGS database layout (<concept>/<file>) instead
        database = np.array([things_database_path(src) for src in table.source])
        differ = (table.source.to_numpy() != stim_source) & (database != stim_source)
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise ValueError(f"{meta}: image {table.image_id.iloc[i]!r} is {table.source.iloc[i]!r} in the MEG "
                             f"metadata but {stim_source[i]!r} in {where} ({int(differ.sum())} such images)")
    return table


def load_meg_subject(root: str | os.PathLike, subject: int, source: str, params: dict | None = None,
                     stimulus_table: pd.DataFrame | str | os.PathLike | None = None) -> MEGSubject:
    """Load and preprocess one THINGS-MEG subject from the raw BIDS runs or the preprocessed epochs.

    All metadata (runs, events, sample attributes, image ids against the stimulus
    table) is validated before MEG data is read. See the module docstring for the steps.

    Parameters
    ----------
    root : path
        THINGS-MEG root (``sub-BIGMEG*``, ``sourcedata``, ``derivatives``).
    subject : int
        Participant number n (``sub-BIGMEG{n}``, ``P{n}``).
    source : {"raw", "derivative"}
    params : dict
        Keys of :data:`DEFAULT_PARAMS`.
    stimulus_table : DataFrame or Parquet path, optional
        Every MEG image must be in it (``missing_images: error``) with the same ``source`` path.

    Returns
    -------
    MEGSubject
    """
    p = resolve_params(params)
    trials = collect_trials(root, subject, source, p)
    if source == "raw":  # chronological within each run, as MNE expects events
        trials = trials.sort_values(["session_nr", "run_nr", "event_order"], kind="stable").reset_index(drop=True)
    n_catch = int((trials.trial_type == "catch").sum())
    table = _image_table(trials, subject)
    table = _check_stimuli(table, trials, stimulus_table, p["missing_images"])
    use = trials[(trials.trial_type != "catch") & trials.image_id.isin(table.image_id)]
    log.info("THINGS-MEG P%s (%s): %d trials, %d catch trials dropped, %d images (%d test) from %d trials",
             subject, source, len(trials), n_catch, len(table), int((table.split == "test").sum()), len(use))
    if use.empty:
        raise ValueError(f"{trials.meta_path.iloc[0]}: no exp/test trial left to process for P{subject}")
    acc = _ImageAccumulator(list(table.image_id), p["repeats"])
    if source == "raw":
        times, channels, n_dropped, leads = _process_raw_runs(use, trials, root, subject, p, acc)
    else:
        times, channels = _process_derivative(use, trials, subject, p, acc)
        n_dropped, leads = 0, {}
    runs = _run_table(trials, subject, leads)
    data, keep = acc.mean()
    if not keep.all():
        log.warning("P%s: %d image(s) lost every epoch and are left out: %s", subject, int((~keep).sum()),
                    list(table.image_id[~keep][:10]))
    table = table[keep].reset_index(drop=True)
    table["n_averaged"] = acc.counts[keep]
    if p["zscore"]:
        data = zscore_images(data)
    report = {"subject": int(subject), "source": source, "n_trials": int(len(trials)), "n_catch_dropped": n_catch,
              "n_epochs_dropped": int(n_dropped), "n_images": int(len(table)),
              "n_test_images": int((table.split == "test").sum()),
              "n_mismatches": int(trials.mismatch.sum()) if "mismatch" in trials else None,
              "sfreq": float(p["sfreq"]), "times": [float(t) for t in times], "channels": list(channels),
              "params": p}
    return MEGSubject(data.astype(np.float32), table, np.asarray(times, dtype=np.float64), list(channels), report,
                      runs)


def _run_table(trials: pd.DataFrame, subject: int, leads: dict) -> pd.DataFrame:
    """One row per run: trials, events/attributes mismatches (raw source), trigger leads over ``sample`` (s)."""
    rows = []
    for (ses, run), t in trials.groupby(["session_nr", "run_nr"], sort=True):
        lead = leads.get((int(ses), int(run)))
        stats = (np.median(lead), lead.min(), lead.max()) if lead is not None and len(lead) else (np.nan,) * 3
        rows.append((int(subject), int(ses), int(run), len(t), int(t.mismatch.sum()) if "mismatch" in t else pd.NA,
                     *map(float, stats)))
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    runs["n_mismatches"] = runs.n_mismatches.astype("Int64")
    return runs


def _process_raw_runs(use: pd.DataFrame, trials: pd.DataFrame, root, subject: int, p: dict,
                      acc: _ImageAccumulator):
    """Raw source: read, find onsets, filter, resample and epoch each run in turn, accumulating per image.

    Returns times, channels, the number of epochs dropped and, per (session, run), the
    trigger's lead over the events ``sample`` column (s, one value per events row).
    """
    from tqdm.auto import tqdm

    channels = times = None
    n_dropped = 0
    leads = {}
    groups = list(use.groupby(["session_nr", "run_nr"], sort=True))
    for (ses, run), run_trials in tqdm(groups, desc=f"MEG P{subject} runs", disable=None):
        path = Path(run_trials.raw_path.iloc[0])
        raw = read_meg_run(path, root)
        all_rows = trials[(trials.session_nr == ses) & (trials.run_nr == run)]
        samples, leads[(int(ses), int(run))] = run_onsets(raw, run_trials, all_rows, p["onset"])
        data, t, ch, kept = preprocess_raw_run(raw, samples, p)
        del raw
        if channels is None:
            channels, times = ch, t
        elif ch != channels or len(t) != len(times) or not np.allclose(t, times):
            raise ValueError(f"{path}: channels or epoch times differ from the first run "
                             f"({len(ch)} vs {len(channels)} channels, {len(t)} vs {len(times)} times)")
        if len(kept) < len(run_trials):
            lost = len(run_trials) - len(kept)
            n_dropped += lost
            log.warning("%s: %d epoch(s) dropped by MNE (window %s..%s s outside the recording)", path, lost,
                        p["tmin"], p["tmax"])
        acc.add(run_trials.image_id.to_numpy()[kept], _apply_baseline(data, times, p["baseline"]))
    return times, channels, n_dropped, leads


def run_onsets(raw, run_trials: pd.DataFrame, all_rows: pd.DataFrame, onset: str) -> tuple[np.ndarray, np.ndarray]:
    """Onset samples of one run's trials, from the trigger channel or the events ``sample`` column.

    The events file's ``onset`` (s) and ``sample`` must agree within one sample (``sample``
    counted from the file's first sample, or absolute as mne-bids writes it). ``trigger``:
    the ``UPPT001`` events of value 64 (one per events row, catch trials included) taken in
    order of the events onsets; ``sample``: the ``sample`` column (photodiode-corrected).

    Parameters
    ----------
    raw : mne.io.Raw
        The run, before channels are picked (the trigger channel is needed).
    run_trials : DataFrame
        The trials to epoch (:func:`collect_trials` rows: ``onset, sample, event_order``).
    all_rows : DataFrame
        Every events row of the run (catch included), same columns.
    onset : {"trigger", "sample"}

    Returns
    -------
    samples : ndarray of int, shape (len(run_trials),)
        MNE event samples (``raw.first_samp`` included).
    lead : ndarray of float, shape (n_rows_with_sample,)
        ``sample`` minus trigger (s) for every events row with a ``sample`` (empty when the
        run has no ``sample`` column or no trigger channel is needed and present).

    Raises
    ------
    ValueError
        Naming the events file, session and run: ``onset`` and ``sample`` disagree, the
        ``sample`` column is missing in ``sample`` mode, the trigger channel is missing or
        holds another number of image triggers than the events file has rows.
    """
    import mne

    where = (f"{all_rows.events_path.iloc[0]} (session {all_rows.session_nr.iloc[0]}, "
             f"run {all_rows.run_nr.iloc[0]})")
    sf, first = raw.info["sfreq"], raw.first_samp
    rows = all_rows.sort_values("event_order")
    s = rows["sample"].to_numpy(dtype=float)
    have = ~np.isnan(s)
    from_onset = np.round(rows.onset.to_numpy() * sf)
    offset = 0  # 'sample' counted from the first sample of the file (CTF: first_samp = 0) ...
    if have.any() and first and np.all(np.abs(s[have] - from_onset[have] - first) <= 1):
        offset = first  # ... or absolute, as mne-bids writes it
    bad = have & (np.abs(s - offset - from_onset) > 1)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} events row(s) have a 'sample' that differs from "
                         f"onset x {sf:g} Hz by more than one sample (first at onset(s) "
                         f"{list(rows.onset[bad][:3])} s): 'onset' and 'sample' must describe the same times")
    abs_sample = first + s - offset
    if onset == "sample":
        missing = run_trials["sample"].isna()
        if missing.any():
            raise ValueError(f"{where}: onset: sample needs the events 'sample' column, n/a on "
                             f"{int(missing.sum())} exp/test row(s); use onset: trigger")
    if TRIGGER_CHANNEL not in raw.ch_names:
        if onset == "trigger":
            raise ValueError(f"{where}: no {TRIGGER_CHANNEL} trigger channel in {raw.filenames[0]} (onset: trigger); "
                             "use onset: sample")
        return (first + run_trials["sample"].to_numpy() - offset).astype(np.int64), np.array([])
    found = mne.find_events(raw, stim_channel=TRIGGER_CHANNEL, initial_event=True, verbose="error")
    trig = found[found[:, 2] == IMAGE_TRIGGER, 0]
    if len(trig) != len(rows):
        if onset == "trigger":
            raise ValueError(f"{where}: {len(trig)} image triggers (value {IMAGE_TRIGGER}) on {TRIGGER_CHANNEL} but "
                             f"{len(rows)} events rows; one trigger per image is expected (use onset: sample)")
        log.warning("%s: %d image triggers for %d events rows; trigger offsets not measured", where, len(trig), len(rows))
        return (first + run_trials["sample"].to_numpy() - offset).astype(np.int64), np.array([])
    lead = (abs_sample[have] - trig[have]) / sf
    if len(lead):
        log.info("%s: the trigger leads the events 'sample' by %.1f ms (median; %.1f..%.1f)", where,
                 1e3 * np.median(lead), 1e3 * lead.min(), 1e3 * lead.max())
    if onset == "trigger":
        return trig[run_trials.event_order.to_numpy()].astype(np.int64), lead
    return (first + run_trials["sample"].to_numpy() - offset).astype(np.int64), lead


def _process_derivative(use: pd.DataFrame, trials: pd.DataFrame, subject: int, p: dict, acc: _ImageAccumulator):
    """Derivative source: read the epochs lazily, process chunk by chunk, accumulating per image."""
    import mne
    from tqdm.auto import tqdm

    path = Path(use.epochs_path.iloc[0])
    meta_path = trials.meta_path.iloc[0]
    epochs = _read_fif_guarded(path, lambda: mne.read_epochs(path, preload=False, verbose="error"),
                               "the preprocessed epochs")
    n_expected = trials.attrs.get("n_epochs_expected", len(trials))
    if len(epochs) != n_expected:
        raise ValueError(f"{path} holds {len(epochs)} epochs but {meta_path} lists {n_expected} trials; they must "
                         "correspond row by row (truncated epochs file, or sample attributes of another participant?)")
    if epochs.metadata is not None and "things_image_nr" in epochs.metadata:
        a = pd.to_numeric(epochs.metadata.things_image_nr, errors="coerce").to_numpy()[trials.epoch.to_numpy()]
        b = trials.things_image_nr.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        if not np.array_equal(a, b, equal_nan=True):
            raise ValueError(f"{path}: embedded metadata things_image_nr disagree with {meta_path}")
    channels = _meg_channels(epochs.info, p["exclude_channels"], path)
    if p["tmin"] < epochs.tmin or p["tmax"] > epochs.tmax:
        log.warning("%s covers %.3f..%.3f s only: the requested %s..%s s window is cropped to what exists",
                    path, epochs.tmin, epochs.tmax, p["tmin"], p["tmax"])
    rows, ids = use.epoch.to_numpy(), use.image_id.to_numpy()
    info = mne.pick_info(epochs.info, mne.pick_channels(epochs.ch_names, channels, ordered=True))
    size = int(p["chunk_size"])
    times = None
    for start in tqdm(range(0, len(rows), size), desc=f"MEG P{subject} epochs", disable=None):
        chunk = rows[start:start + size]
        x = _read_fif_guarded(path, lambda: epochs.get_data(picks=channels, item=chunk, verbose="error"),
                              "the preprocessed epochs")
        data, times = preprocess_epochs(mne.EpochsArray(x, info, tmin=epochs.tmin, baseline=None, verbose="error"), p)
        acc.add(ids[start:start + size], _apply_baseline(data, times, p["baseline"]))
    return times, channels


# ----------------------------------------------------------------------------- outputs


def write_meg_table(table: pd.DataFrame, path: str | os.PathLike, meta: dict) -> None:
    """Write ``table`` to Parquet atomically with ``meta`` (JSON) under schema metadata ``brainprop_meg``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with atomic_output(path, ".parquet.tmp") as tmp:
        pq.write_table(arrow, tmp)


def read_meg_table(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a prepared MEG image table and its metadata (times, channels, counts, parameters)."""
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    meta = (arrow.schema.metadata or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"{path}: no {META_KEY.decode()} metadata (not written by prepare_meg_subject)")
    return arrow.to_pandas(), json.loads(meta)


def prepare_meg_subject(root: str | os.PathLike, subject: int, source: str, out_data: str | os.PathLike,
                        out_table: str | os.PathLike, out_times: str | os.PathLike, params: dict | None = None,
                        stimulus_table: str | os.PathLike | pd.DataFrame | None = None,
                        out_mismatches: str | os.PathLike | None = None) -> dict:
    """Load, preprocess and write one THINGS-MEG subject (the workflow rule's entry point).

    Parameters
    ----------
    root : path
        THINGS-MEG dataset root.
    subject : int
        Participant number (1..4 in THINGS-MEG).
    source : {"raw", "derivative"}
    out_data : path
        ``.npy`` float32 (n_images, n_channels, n_times).
    out_table : path
        Parquet, one row per image (order of ``out_data``), metadata ``brainprop_meg``.
    out_times : path
        ``.npy`` float64 (n_times,), seconds relative to image onset.
    params : dict
        Keys of :data:`DEFAULT_PARAMS` (config ``meg:``).
    stimulus_table : path or DataFrame, optional
        The THINGS stimulus table; every MEG image must be in it.
    out_mismatches : path, optional
        Parquet, one row per run (:data:`RUN_COLUMNS`): events/attributes mismatches and
        the trigger's lead over the events ``sample`` column (s).

    Returns
    -------
    report : dict
        Counts (trials, catch trials dropped, epochs dropped, images, mismatches), sfreq, times, channels.
    """
    subj = load_meg_subject(root, subject, source, params, stimulus_table)
    written = []
    try:
        save_npy_atomic(out_data, subj.data)
        written.append(Path(out_data))
        save_npy_atomic(out_times, subj.times)
        written.append(Path(out_times))
        if out_mismatches is not None:
            save_parquet_atomic(subj.runs, out_mismatches)
            written.append(Path(out_mismatches))
        write_meg_table(subj.table, out_table, subj.report)
    except BaseException:
        for w in written:
            w.unlink(missing_ok=True)
        raise
    log.info("wrote %s %s, %s, %s; mismatches per run: %s", subj.data.shape, out_data, out_table, out_times,
             subj.runs.n_mismatches.tolist())
    return subj.report
