"""Small shared utilities: logging, atomic writes, device selection."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Return a module logger (configured by :func:`log_to_file` in rule scripts)."""
    return logging.getLogger(name)


def log_to_file(path: str | os.PathLike) -> None:
    """Send INFO logs to ``path`` (a rule's ``log:`` file) and to stderr; used by every rule script."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True,
                        handlers=[logging.FileHandler(path), logging.StreamHandler()])


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``, moved onto ``path`` only if the block succeeds.

    A crash or an exception never leaves a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (.npy) atomically (see :func:`atomic_output`)."""
    with atomic_output(path, ".npy.tmp") as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def save_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame to Parquet atomically (see :func:`atomic_output`)."""
    with atomic_output(path, ".parquet.tmp") as tmp:
        table.to_parquet(tmp, index=False)


def merge_params(defaults: dict, params: dict | None, what: str) -> dict:
    """``defaults`` updated with ``params``; a key absent from ``defaults`` raises ``ValueError`` naming it."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **params}


def resolve_device(device: str | None = None):
    """Map ``None``/``"auto"`` to CUDA when available, else CPU; pass other names to :class:`torch.device`."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def stable_seed(*parts) -> int:
    """Deterministic 63-bit seed from ``parts`` (str/int), stable across processes and Python versions.

    Unlike ``hash()`` it does not depend on ``PYTHONHASHSEED``; e.g. ``stable_seed(seed, image_id)``
    seeds the random views of one image independently of the batch it is in.
    """
    import hashlib

    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
