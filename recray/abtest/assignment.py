"""Randomisation: the arm of a unit by a salted hash of its id, shared by `recray serve` and the harness."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


def unit_point(unit_id: object, salt: str) -> float:
    """A unit's uniform point on [0, 1): blake2b of `salt:unit_id` (never Python's `hash`).

    Stable across processes, machines and days, so the endpoint and the harness agree.
    """
    digest = hashlib.blake2b(f"{salt}:{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_variant(unit_id: object, salt: str, names: Sequence[str], shares: Sequence[float]) -> str:
    """The arm of one unit: its hash point cut at the cumulative traffic shares."""
    point = unit_point(unit_id, salt) * sum(shares)
    for name, edge in zip(names, np.cumsum(shares), strict=True):
        if point < edge:
            return name
    return names[-1]


def assign_arms(unit_ids: Iterable[object], salt: str, shares: Sequence[float]) -> np.ndarray:
    """Arm index (into `shares`) of every unit, the vector form of `assign_variant`."""
    points = np.fromiter((unit_point(u, salt) for u in unit_ids), dtype=np.float64)
    edges = np.cumsum(np.asarray(shares, dtype=np.float64))
    return np.minimum(np.searchsorted(edges, points * edges[-1], side="right"), len(shares) - 1)
