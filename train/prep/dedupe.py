"""Duplicate detection: exact (sha256 of the file bytes) and near (perceptual hash).

The first image seen is kept; later ones are reported with the id they duplicate. Near-duplicate
search compares a 64-bit pHash (Zauner 2010, as implemented by `imagehash.phash`) against every
kept hash with vectorised XOR + popcount: O(n^2) but ~1 ns per pair, fine to hundreds of thousands.
"""

from __future__ import annotations

import numpy as np


class Deduplicator:
    def __init__(self, near_dup: bool = False, max_distance: int = 4) -> None:
        self.near_dup = near_dup
        self.max_distance = max_distance
        self._by_sha: dict[str, str] = {}
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self._hash_ids: list[str] = []

    def check(self, record_id: str, sha256: str, phash: int | None) -> tuple[str, str] | None:
        """None if `record_id` is new (and remember it), else (kind, id of the kept original)."""
        if sha256 in self._by_sha:
            return "exact duplicate", self._by_sha[sha256]
        if self.near_dup and phash is not None:
            count = len(self._hash_ids)
            if count:
                distances = np.bitwise_count(self._hashes[:count] ^ np.uint64(phash))
                nearest = int(np.argmin(distances))
                if int(distances[nearest]) <= self.max_distance:
                    return "near duplicate", self._hash_ids[nearest]
            if count == len(self._hashes):
                self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
            self._hashes[count] = np.uint64(phash)
            self._hash_ids.append(record_id)
        self._by_sha[sha256] = record_id
        return None
