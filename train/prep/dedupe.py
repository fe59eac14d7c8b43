"""Duplicate detection: exact (sha256 of the file bytes) and near (perceptual hash).

Which exact copy is kept: the one with a caption, then the one with the most repeats, then the
first seen. A loose uncaptioned copy at a kohya folder's root must not win over the captioned
copy in `10_name/`, or the image loses its caption and its repeats. A copy can replace the one
kept so far only while that one is still replaceable (its row not yet written, see
`train.prep.pipeline`). Near duplicates keep the first seen.

Near-duplicate search compares a 64-bit pHash (Zauner 2010, as implemented by `imagehash.phash`)
against every kept hash with vectorised XOR + popcount: O(n^2) but ~1 ns per pair, fine to
hundreds of thousands.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Duplicate(NamedTuple):
    dropped: str  # the id left out of the dataset (the new copy, or the one kept before it)
    kind: str
    kept: str


class Deduplicator:
    def __init__(self, near_dup: bool = False, max_distance: int = 4) -> None:
        self.near_dup = near_dup
        self.max_distance = max_distance
        # sha256 -> (kept id, its rank or None when it can no longer be replaced)
        self._by_sha: dict[str, tuple[str, tuple | None]] = {}
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self._hash_shas: list[str] = []

    def check(self, record_id: str, sha256: str, phash: int | None,
              rank: tuple | None = None) -> Duplicate | None:
        """None if `record_id` is new (and remember it), else the Duplicate to report.

        `rank` orders exact copies (higher wins, e.g. (has caption, repeats)); None: this copy
        is final and can never be replaced. When the new copy outranks the replaceable one kept
        so far, it takes its place and the Duplicate names the earlier one as `dropped`.
        """
        kept = self._by_sha.get(sha256)
        if kept is not None:
            kept_id, kept_rank = kept
            if rank is not None and kept_rank is not None and rank > kept_rank:
                self._by_sha[sha256] = (record_id, rank)
                return Duplicate(kept_id, "exact duplicate (the copy with a caption, then more repeats, is kept)",
                                 record_id)
            return Duplicate(record_id, "exact duplicate", kept_id)
        if self.near_dup and phash is not None:
            count = len(self._hash_shas)
            if count:
                distances = np.bitwise_count(self._hashes[:count] ^ np.uint64(phash))
                nearest = int(np.argmin(distances))
                if int(distances[nearest]) <= self.max_distance:
                    return Duplicate(record_id, "near duplicate", self._by_sha[self._hash_shas[nearest]][0])
            if count == len(self._hashes):
                self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
            self._hashes[count] = np.uint64(phash)
            self._hash_shas.append(sha256)
        self._by_sha[sha256] = (record_id, rank)
        return None
