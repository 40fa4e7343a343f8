"""Near-duplicate images: embedding cosine similarity, plus a perceptual hash for exact and resized copies.

Both searches are blocked, so memory grows with N x (block + k), never N x N: the features are read from a
memory map `block` rows at a time, each block is compared with every other block, and each image keeps only
its `k` most similar partners. A pair is reported when its cosine similarity reaches `threshold`, or when the
perceptual hashes (DCT hash of the 32 x 32 greyscale image, 64 bits) differ in at most `hash_distance` bits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class Pair:
    a: int
    b: int
    similarity: float  # cosine similarity of the pooled features
    hash_distance: Optional[int]  # differing bits of the perceptual hashes (None: not computed)


def _rows(features: np.ndarray, start: int, stop: int) -> torch.Tensor:
    block = torch.from_numpy(np.asarray(features[start:stop], dtype=np.float32))
    return torch.nn.functional.normalize(block, dim=1)


def nearest_neighbours(features: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(similarity [N, k], index [N, k]) of each row's k most similar other rows, by blocked search."""
    n = len(features)
    k = max(1, min(k, n - 1))
    best_sim = np.full((n, k), -np.inf, dtype=np.float32)
    best_idx = np.zeros((n, k), dtype=np.int64)
    for r0 in range(0, n, block):
        rows = _rows(features, r0, min(n, r0 + block))
        sims, idxs = torch.full((len(rows), k), -float("inf")), torch.zeros((len(rows), k), dtype=torch.long)
        for c0 in range(0, n, block):
            scores = rows @ _rows(features, c0, min(n, c0 + block)).T
            if c0 == r0:
                scores.fill_diagonal_(-float("inf"))  # not its own neighbour
            merged = torch.cat([sims, scores], dim=1)
            candidates = torch.cat([idxs, torch.arange(c0, c0 + scores.shape[1]).expand(len(rows), -1)], dim=1)
            sims, order = merged.topk(k, dim=1)
            idxs = candidates.gather(1, order)
        best_sim[r0 : r0 + len(rows)], best_idx[r0 : r0 + len(rows)] = sims.numpy(), idxs.numpy()
    return best_sim, best_idx


def _phash(path: Path) -> int:
    import imagehash
    from PIL import Image

    with Image.open(path) as img:
        img.draft("L", (128, 128))  # JPEG: decode at 1/2..1/8 scale; the hash looks at 32 x 32 pixels
        return int(str(imagehash.phash(img.convert("L"))), 16)


def perceptual_hashes(paths: Sequence[Path], workers: int) -> np.ndarray:
    """64-bit perceptual hash of each image (threads: Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return np.array(list(pool.map(_phash, paths)), dtype=np.uint64)


def hash_neighbours(hashes: np.ndarray, max_distance: int, block: int = 2048) -> list[tuple[int, int, int]]:
    """(a, b, differing bits) for every pair a < b within `max_distance` bits, block by block."""
    found = []
    for r0 in range(0, len(hashes), block):
        rows = hashes[r0 : r0 + block]
        distances = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            a, b = r0 + int(i), int(j)
            if a < b:
                found.append((a, b, int(distances[i, j])))
    return found


def cosine(features: np.ndarray, a: int, b: int) -> float:
    x, y = _rows(features, a, a + 1)[0], _rows(features, b, b + 1)[0]
    return float(x @ y)


def find_duplicates(
    features: np.ndarray,
    neighbours: tuple[np.ndarray, np.ndarray],
    hashes: Optional[np.ndarray],
    threshold: float,
    hash_distance: int,
    hash_min_similarity: float,
) -> list[Pair]:
    """Pairs at or above the similarity threshold (among each image's `neighbours`, from nearest_neighbours), or within
    the hash distance with at least `hash_min_similarity` (unrelated hashes also meet by chance: about 1e-8 of all
    pairs are 10 bits apart, 3 pairs among 25,000 images), most similar first."""
    sims, idxs = neighbours
    pairs: dict[tuple[int, int], Pair] = {}
    for a, b in zip(*np.nonzero(sims >= threshold)):
        i, j = sorted((int(a), int(idxs[a, b])))
        pairs[(i, j)] = Pair(i, j, float(sims[a, b]), None)
    if hashes is not None:
        for i, j, bits in hash_neighbours(hashes, hash_distance):
            pair = pairs.get((i, j)) or Pair(i, j, cosine(features, i, j), None)
            pair.hash_distance = bits
            pairs[(i, j)] = pair
        for pair in pairs.values():
            if pair.hash_distance is None:
                pair.hash_distance = int(np.bitwise_count(hashes[pair.a] ^ hashes[pair.b]))

    def reported(p: Pair) -> bool:
        by_hash = p.hash_distance is not None and p.hash_distance <= hash_distance and p.similarity >= hash_min_similarity
        return p.similarity >= threshold or by_hash

    kept = [p for p in pairs.values() if reported(p)]
    return sorted(kept, key=lambda p: (-p.similarity, p.a, p.b))
