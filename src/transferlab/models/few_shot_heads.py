"""Heads for little data (finetune.head_solver=knn | prototype): no weights to learn, so nothing to overfit.

Both work on L2-normalised features (cosine geometry: the direction of a pooled feature says what the image shows,
its length mostly how much texture it has) and both are ordinary `nn.Module` heads of the classifier, so they
calibrate, test, export (ONNX, TorchScript), predict and serve like the linear probe.

- `prototype`: the nearest class mean (SimpleShot, Wang et al. 2019; the "normalised mean" of Snell et al.'s
  prototypical networks), written as a fixed linear head: `L2Normalize` then a Linear whose row c is
  PROTOTYPE_SCALE x the normalised mean of class c's normalised features, bias 0; logits are scaled cosines.
  Multi-label: row k is the scale x (normalised mean of the positives - normalised mean of the negatives).
- `knn`: DINOv2's weighted k-NN classifier (Oquab et al. 2023; Wu et al. 2018): a memory bank of the normalised
  training features and their one-hot (multi-hot) labels; the k most similar bank rows vote with weight
  exp(cos / KNN_TAU); logits are log of the smoothed vote share (multi-label: its log-odds), so the run's
  temperature calibration acts on them like on any head's.

k is chosen, and the held-out logits that calibrate both heads are made, by exact leave-one-out over the training
images (`knn_leave_one_out`, `prototype_leave_one_out`): one similarity matrix, no refits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.models.multilabel_metrics import average_precision

KNN_TAU = 0.07  # DINOv2's (and Wu et al.'s) vote temperature: weights exp(cos / 0.07)
KNN_GRID = (1, 3, 5, 7, 9, 15, 21)  # the k leave-one-out chooses from (capped below the images available)
KNN_FIXED_K = 20  # the documented k when leave-one-out cannot choose (a class with one image): DINOv2's default
VOTE_PRIOR = 1.0  # one pseudo-vote added to the k real ones, spread over the classes (per label: 0.5 yes, 0.5 no): no logit -inf
PROTOTYPE_SCALE = 1 / KNN_TAU  # cosines x 14.3: a softmax as sharp as the k-NN votes; calibration fits the rest
CHUNK_VALUES = 2**24  # floats per block of the leave-one-out search (rows x max(N, k x K)): 64 MB, whatever N and K


class L2Normalize(nn.Module):
    """Rows scaled to unit length (exports to ONNX as ReduceL2 / Div)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1)


class KNNHead(nn.Module):
    """Weighted k-NN over a memory bank. The bank's size comes from the training data, so the buffers take the
    shapes of whatever state_dict is loaded into them (a checkpoint, a package's safetensors): the classifier
    builds this head empty from its hyper-parameters and loading fills it."""

    bank: torch.Tensor
    bank_labels: torch.Tensor
    k: torch.Tensor

    def __init__(self, num_features: int, num_classes: int, multilabel: bool) -> None:
        super().__init__()
        self.multilabel = multilabel
        self.register_buffer("bank", torch.zeros(0, num_features))  # [N, D] normalised training features
        self.register_buffer("bank_labels", torch.zeros(0, num_classes))  # [N, K] one-hot / multi-hot
        self.register_buffer("k", torch.zeros((), dtype=torch.long))
        self.neighbours = 0  # int(k): topk needs a Python int (a constant in the exported graphs)
        self.register_load_state_dict_pre_hook(self._take_shapes)

    def _take_shapes(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("bank", "bank_labels"):
            if prefix + name in state:
                setattr(self, name, torch.empty_like(state[prefix + name], device=getattr(self, name).device))
        if prefix + "k" in state:
            self.neighbours = int(state[prefix + "k"])

    def fill(self, features: torch.Tensor, targets: torch.Tensor, k: int) -> None:
        """The bank: every training row (views included), normalised; `targets` one-hot or multi-hot [N, K]."""
        self.bank = F.normalize(features.detach().float(), dim=-1).to(self.bank.device)
        self.bank_labels = targets.detach().float().to(self.bank.device)
        self.k = torch.tensor(int(k), dtype=torch.long, device=self.bank.device)
        self.neighbours = int(k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 whatever the autocast: bf16 cosines (3 digits) would reorder near neighbours between runtimes
        with torch.autocast(device_type=features.device.type, enabled=False):
            query = F.normalize(features.float(), dim=-1)
            similarity, index = (query @ self.bank.T).topk(self.neighbours, dim=1)
            weights = torch.exp((similarity - 1.0) / KNN_TAU)  # - 1: the same shares, no overflow
            votes = (weights.unsqueeze(-1) * self.bank_labels[index]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
            return vote_logits(votes, self.neighbours, self.multilabel)


def vote_logits(share: torch.Tensor, k: int, multilabel: bool) -> torch.Tensor:
    """Logits of weighted vote shares [.., K]: k votes plus VOTE_PRIOR spread evenly (a share of 1 from one neighbour
    of two classes is 0.75, of 37 classes 0.51, not 1); log share (softmax gives the smoothed shares back), or for a
    multi-label bank the log-odds of each label's smoothed share."""
    if multilabel:
        smoothed = (share * k + VOTE_PRIOR / 2) / (k + VOTE_PRIOR)
        return torch.log(smoothed) - torch.log1p(-smoothed)
    return torch.log((share * k + VOTE_PRIOR / share.shape[-1]) / (k + VOTE_PRIOR))


def build_head(finetune: Mapping[str, Any], num_features: int, num_classes: int, task: str) -> nn.Module:
    """The head finetune.head_solver asks for, the same structure at training and when a checkpoint or package is
    rebuilt from its hyper-parameters: prototype = normalise + Linear; knn = an empty bank that loading fills;
    anything else dropout + Linear."""
    solver = finetune.get("head_solver")
    if solver == "knn":
        return KNNHead(num_features, num_classes, multilabel=task == "multilabel")
    if solver == "prototype":
        return nn.Sequential(L2Normalize(), nn.Linear(num_features, num_classes))
    return nn.Sequential(nn.Dropout(float(finetune["head_dropout"])), nn.Linear(num_features, num_classes))


def targets_of(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, K] float: one-hot rows of class ids, multi-hot rows as they are."""
    return labels.float() if labels.ndim == 2 else F.one_hot(labels.long(), num_classes).float()


def prototype_weights(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, D]: PROTOTYPE_SCALE x the normalised class means of the normalised rows (multi-hot labels: positives'
    minus negatives'). A class without training rows gets a zero row (logit 0 for every image)."""
    z = F.normalize(features.double(), dim=-1)
    y = targets_of(labels, num_classes).double()
    weights = F.normalize(y.T @ z, dim=-1)
    if labels.ndim == 2:
        weights = weights - F.normalize((1 - y).T @ z, dim=-1)
    return (PROTOTYPE_SCALE * weights).float()


@dataclass
class KnnSelection:
    """k chosen by leave-one-out: `score` its LOO accuracy (multi-hot labels: mAP), `search` one row per k tried,
    `held_out` [images, K] the LOO logits at that k (one row per image, its views averaged), in image order."""

    k: int
    score: float
    search: list[dict[str, float]]
    held_out: torch.Tensor


def _images(groups: Optional[torch.Tensor], rows: int) -> tuple[torch.Tensor, int]:
    """(image 0..M-1 of each row, M): `groups` (the image of each cached view, as training.probe.feature_matrix gives
    them) renumbered in sorted order, as models.linear_probe.select_by_cv orders its held-out rows."""
    if groups is None:
        return torch.arange(rows), rows
    found, image = torch.unique(groups, return_inverse=True)
    return image, len(found)


def per_image(values: torch.Tensor, image: torch.Tensor, count: int) -> torch.Tensor:
    """Rows averaged per image: [M, ...]."""
    total = torch.zeros(count, *values.shape[1:], dtype=values.dtype).index_add_(0, image, values)
    return total / torch.bincount(image, minlength=count).clamp_min(1).to(values.dtype).reshape(-1, *[1] * (values.ndim - 1))


def image_labels(labels: torch.Tensor, image: torch.Tensor, count: int) -> torch.Tensor:
    """The label (row) of each image, from its first row."""
    first = torch.full((count,), len(image), dtype=torch.long).scatter_reduce(0, image, torch.arange(len(image)), "amin")
    return labels[first]


def selection_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, NLL) of held-out logits; multi-hot labels: (mAP, mean binary cross-entropy)."""
    if labels.ndim == 2:
        ap = average_precision(logits.double().sigmoid().numpy(), labels.double().numpy())
        found = float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0
        return found, float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    return float((logits.argmax(dim=-1) == labels).double().mean()), float(F.cross_entropy(logits.double(), labels.long()))


def knn_leave_one_out(
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Optional[Sequence[int]] = None,
    groups: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
) -> KnnSelection:
    """k of the weighted k-NN chosen by exact leave-one-out: every image's neighbours are the other images (with
    `groups`, no cached view of the image itself either); the best LOO accuracy (multi-hot [N, K] labels: mAP)
    wins, ties to the lower NLL, then the smaller k. `ks`: the grid (default KNN_GRID), capped below the rows an
    image can see; `num_classes`: the held-out logits' columns (default: the labels' largest class + 1). One N x N
    cosine matrix in blocks of CHUNK_VALUES floats, the top max(k) neighbours once: O(N^2 D)."""
    multilabel = labels.ndim == 2
    if multilabel:
        num_classes = labels.shape[1]
    elif num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    image, count = _images(groups, len(features))
    rows = len(features) - int(torch.bincount(image).max()) if len(features) else 0  # the fewest rows an image sees
    if rows < 1:
        raise ValueError(f"knn leave-one-out needs at least 2 images (got {count})")
    grid = sorted({min(int(k), rows) for k in (ks or KNN_GRID) if int(k) >= 1})
    z = F.normalize(features.detach().float(), dim=-1)
    y = targets_of(labels, num_classes)
    widest = grid[-1]
    shares = torch.zeros(len(grid), len(z), num_classes)
    chunk = max(1, CHUNK_VALUES // max(len(z), widest * num_classes))
    for start in range(0, len(z), chunk):
        block = slice(start, start + chunk)
        similarity = z[block] @ z.T
        similarity[image[block, None] == image[None, :]] = -float("inf")  # the image itself and its views
        values, index = similarity.topk(widest, dim=1)
        weights = torch.exp((values - 1.0) / KNN_TAU)  # float32, as KNNHead computes them
        cumulative = (weights.unsqueeze(-1) * y[index]).cumsum(dim=1)  # [rows, widest, K]: votes of the first j
        total = weights.cumsum(dim=1)
        for i, k in enumerate(grid):
            shares[i, block] = cumulative[:, k - 1] / total[:, k - 1, None]
    targets = image_labels(labels, image, count)
    search, held = [], []
    score_name = "loo_map" if multilabel else "loo_acc"
    for i, k in enumerate(grid):
        logits = per_image(vote_logits(shares[i], k, multilabel), image, count)
        score, nll = selection_score(logits, targets)
        search.append({"k": k, score_name: score, "loo_nll": nll})
        held.append(logits)
    best = max(range(len(grid)), key=lambda i: (search[i][score_name], -search[i]["loo_nll"], -grid[i]))
    return KnnSelection(grid[best], float(search[best][score_name]), search, held[best].float())


def prototype_leave_one_out(features: torch.Tensor, labels: torch.Tensor, num_classes: int, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[images, K] leave-one-out logits of the prototype head, in closed form: each image is scored against class
    sums without its own rows (its views too), cos(z, S - g) = (z.S - z.g) / ||S - g||; views averaged per image.
    A class left with no rows gets logit 0, as prototype_weights' zero row for it would give."""
    image, count = _images(groups, len(features))
    z = F.normalize(features.detach().double(), dim=-1)
    y = targets_of(labels, num_classes).double()
    own = image_labels(y, image, count)  # [M, K]: the classes each image belongs to
    g = torch.zeros(count, z.shape[1], dtype=torch.float64).index_add_(0, image, z)  # each image's rows summed

    def cosines(sums: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """[rows, K] cosine of each row with each column's sum, the row's image removed where it is a member."""
        norms2 = (sums * sums).sum(dim=1)  # [K]
        gz = g @ sums.T  # [M, K]
        gg = (g * g).sum(dim=1, keepdim=True)  # [M, 1]
        m = member[image]  # [rows, K]
        dot = z @ sums.T - m * (z * g[image]).sum(dim=1, keepdim=True)
        left = (norms2 - 2 * member * gz + member * gg).clamp_min(0)[image]
        return torch.where(left > 1e-12, dot / left.clamp_min(1e-12).sqrt(), torch.zeros_like(dot))

    logits = cosines(y.T @ z, own)
    if labels.ndim == 2:
        logits = logits - cosines((1 - y).T @ z, 1 - own)
    return per_image(PROTOTYPE_SCALE * logits, image, count).float()
