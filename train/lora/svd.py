"""Truncated SVD of a module's delta: the best rank-k approximation and the energy it keeps.

By Eckart-Young, keeping the k largest singular values of a delta D gives the rank-k matrix
closest to D in Frobenius norm; the share of D's energy (||D||_F^2 = sum of sigma_i^2) it keeps
is sum_{i<=k} sigma_i^2 / sum_i sigma_i^2. A factored delta `up @ down` of rank r is decomposed
through two thin QRs (up = Qu Ru, down^T = Qd Rd, then the SVD of the r x r matrix Ru Rd^T),
exact and O((out + in) r^2); a full delta through `torch.linalg.svd` in fp64. A randomized
SVD (`torch.svd_lowrank`) was measured 15x faster on SDXL differences but keeping 1-2 points
less energy when the rank cuts into the spectrum (bench/RESULTS.md), so it is not offered.

The rank of each module is chosen by one rule (`RankRule`): a fixed rank, the smallest rank
keeping a share of the energy, or sd-scripts' `sv_ratio` (keep singular values at least
sigma_max / ratio). The rule also says where the SVDs run: an SDXL extract is about 2e13 fp64
flops, half an hour on two CPU cores and seconds on a data-centre GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from train.lora.deltas import Delta


@dataclass(frozen=True)
class RankRule:
    """Exactly one of: `rank` (at most this rank), `energy` (share of energy in (0, 1]), `sv_ratio` (> 1);
    `device`: where the SVDs run (a torch device name; results come back to the CPU)."""

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        given = [v for v in (self.rank, self.energy, self.sv_ratio) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of --rank, --energy, --sv-ratio")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank {self.rank}: must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"--energy {self.energy}: must be in (0, 1]")
        if self.sv_ratio is not None and not self.sv_ratio > 1:
            raise ValueError(f"--sv-ratio {self.sv_ratio}: must be greater than 1")

    def choose(self, singular_values: Tensor) -> int:
        """The rank this rule keeps of a module with these singular values (descending); >= 1."""
        s = singular_values.double()
        if self.rank is not None:
            return max(1, min(self.rank, s.numel()))
        if self.sv_ratio is not None:
            return max(1, int((s >= s[0] / self.sv_ratio).sum()))
        energy = s.square().cumsum(0)
        if energy[-1] <= 0:
            return 1
        # Smallest k whose share reaches the target (a hair of slack for rounding at 1.0).
        return max(1, min(int((energy / energy[-1] < self.energy - 1e-12).sum()) + 1, s.numel()))


@dataclass
class Truncated:
    """A rank-k approximation `up @ down` of a delta and the energy bookkeeping of the cut."""

    up: Tensor  # (out, k), fp32
    down: Tensor  # (k, in * kh * kw), fp32
    energy: float  # ||D||_F^2 of the delta
    kept: float  # ||D_k||_F^2 = sum of the k kept sigma^2

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def share(self) -> float:
        """Share of the delta's energy kept (1.0 for a zero delta)."""
        return self.kept / self.energy if self.energy > 0 else 1.0


def svd(delta: Delta, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the delta's matrix, in fp64 on `device`: U (out, n), S (n,) descending, Vh (n, in * kh * kw)."""
    if delta.factored:
        return _factored_svd(delta.up.to(device).double(), delta.down.to(device).double())
    return torch.linalg.svd(delta.matrix().to(device).double(), full_matrices=False)


def _factored_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of up @ down (up (out, r), down (r, in)) without forming the product."""
    q_up, r_up = torch.linalg.qr(up)  # (out, r), (r, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def truncate(delta: Delta, rule: RankRule) -> Truncated:
    """The delta's best approximation at the rank `rule` chooses, split as up = U sqrt(S),
    down = sqrt(S) Vh (balanced factors keep fp16 files in range)."""
    u, s, vh = svd(delta, rule.device)
    k = rule.choose(s)
    root = s[:k].sqrt()
    return Truncated(up=(u[:, :k] * root).float().cpu(), down=(root[:, None] * vh[:k]).float().cpu(),
                     energy=float(s.double().square().sum()), kept=float(s[:k].double().square().sum()))
