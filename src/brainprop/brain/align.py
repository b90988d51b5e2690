"""Align brain-data rows to the stimulus table (and feature matrices) by ``image_id``, never by position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["align_to_stimuli", "reorder_rows"]


def _describe_missing(missing: Sequence[str]) -> str:
    missing = list(missing)
    head = ", ".join(map(str, missing[:10]))
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    return f"{len(missing)} image id(s): {head}{more}"


def align_to_stimuli(
    brain_table: pd.DataFrame,
    stimulus_table: pd.DataFrame,
    id_column: str = "image_id",
) -> pd.DataFrame:
    """Attach stimulus-table columns to each brain row, matching by image id.

    Parameters
    ----------
    brain_table : DataFrame, n_brain rows
        One row per brain sample (image, epoch...); ids may repeat (e.g. MEG test
        images shown several times). Row order is preserved.
    stimulus_table : DataFrame, n_stimuli rows
        One row per image; ids must be unique.
    id_column : str
        Column holding the image id in both tables.

    Returns
    -------
    aligned : DataFrame, n_brain rows
        ``brain_table`` (index reset) with the stimulus columns it does not already
        have, plus ``stimulus_row``: the 0-based position of the matching row in
        ``stimulus_table`` (use it to index feature matrices aligned to that table).

    Raises
    ------
    ValueError
        If ``id_column`` is missing from either table, stimulus ids are not unique,
        or some brain image ids are absent from the stimulus table (the message
        lists the first 10 missing ids and their count).
    """
    for name, table in (("brain table", brain_table), ("stimulus table", stimulus_table)):
        if id_column not in table.columns:
            raise ValueError(f"{name} has no {id_column!r} column (columns: {list(table.columns)})")
    stim_ids = stimulus_table[id_column].astype(str)
    dup = stim_ids[stim_ids.duplicated()].unique()
    if dup.size:
        raise ValueError(f"stimulus table: {id_column} must be unique; duplicated {_describe_missing(dup)}")
    position = pd.Series(np.arange(len(stimulus_table)), index=stim_ids.to_numpy())
    brain_ids = brain_table[id_column].astype(str)
    absent = ~brain_ids.isin(position.index)
    if absent.any():
        missing = pd.unique(brain_ids[absent])
        raise ValueError(f"brain images absent from the stimulus table: {_describe_missing(missing)}")
    rows = position.loc[brain_ids.to_numpy()].to_numpy()
    out = brain_table.reset_index(drop=True).copy()
    extra = [c for c in stimulus_table.columns if c not in out.columns]
    stim = stimulus_table.reset_index(drop=True)
    for c in extra:
        out[c] = stim[c].to_numpy()[rows]
    out["stimulus_row"] = rows.astype(np.int64)
    return out


def reorder_rows(
    array: np.ndarray,
    row_ids: Sequence[str],
    target_ids: Sequence[str],
    what: str = "array",
) -> np.ndarray:
    """Return the rows of ``array`` in the order of ``target_ids``, matching by id.

    Parameters
    ----------
    array : ndarray, shape (n_rows, ...)
        Rows aligned to ``row_ids``.
    row_ids : sequence of str, length n_rows
        Unique id of each row of ``array``.
    target_ids : sequence of str, length n_targets
        Ids wanted, in the wanted order (repeats allowed).
    what : str
        Name used in error messages (e.g. ``"forward layer 3"``).

    Returns
    -------
    reordered : ndarray, shape (n_targets, ...)

    Raises
    ------
    ValueError
        Length mismatch, duplicated ``row_ids``, or target ids absent from ``row_ids``.
    """
    array = np.asarray(array)
    row_ids = pd.Index(np.asarray(row_ids, dtype=str))
    if array.shape[0] != len(row_ids):
        raise ValueError(f"{what}: {array.shape[0]} rows but {len(row_ids)} row ids")
    if row_ids.has_duplicates:
        raise ValueError(f"{what}: row ids must be unique; duplicated {_describe_missing(row_ids[row_ids.duplicated()].unique())}")
    target = np.asarray(target_ids, dtype=str)
    idx = row_ids.get_indexer(target)
    if np.any(idx < 0):
        raise ValueError(f"{what}: missing rows for {_describe_missing(pd.unique(target[idx < 0]))}")
    return array[idx]
