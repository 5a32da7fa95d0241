"""Null-space bases and projections. Pure maths: no I/O, no model.

For a linear layer y = W x with input dimension d, U (d, k) is an orthonormal basis
of the inputs that retained knowledge sends through the layer. A LoRA update
dW = B A (A is r x d) leaves every retained input untouched when A U = 0:

    A <- A (I - U U^T)                                         (project_out)

Bases grow as in Gradient Projection Memory (Saha et al., 2021): given the Gram
matrix G = R^T R of new retained inputs R (n, d), the part U does not capture is
P G P with P = I - U U^T; its top eigenvectors are added until the captured share
of trace(G) reaches the threshold. P is never formed: every product with it is one
with U (d, k), at O(d^2 k) where a formed P costs O(d^3) and another d x d matrix.

For wide layers G itself is too big to hold (about 1 GB at d = 11008): a `Sketch`
of R with at most 2l rows stands for it, B^T B ~ G, and what U does not capture
is then read off the singular vectors of B - (B U) U^T, at O(l d k + l^2 d).
"""

import numpy as np
import torch

from registry import Basis


def project_out(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A (I - U U^T) for A (r, d) and orthonormal U (d, k), without forming the d x d projector."""
    return a - (a @ u) @ u.T


class Sketch:
    """Frequent Directions (Liberty, 2013; Ghashami et al., 2016): rows B (m <= 2l, d) of the
    inputs R added to it, in O(l d) memory however many rows come, such that for every x

        0 <= x^T (R^T R - B^T B) x <= shrunk * |x|^2,  shrunk <= |R - R_j|_F^2 / (l - j) for any j < l,

    R_j being R's best rank-j approximation. Inputs of rank at most l are kept exactly
    (nothing is shrunk). `total` is trace(R^T R), exactly."""

    def __init__(self, dim: int, rows: int):
        self.rows, self.total, self.shrunk = rows, 0.0, 0.0
        self._b = torch.zeros(2 * rows, dim, dtype=torch.float64)
        self._used = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x (n, d)."""
        x = x.double()
        self.total += float((x * x).sum())
        while len(x):
            if self._used == len(self._b):
                self._shrink()
            take = min(len(x), len(self._b) - self._used)
            self._b[self._used:self._used + take] = x[:take]
            self._used, x = self._used + take, x[take:]

    def _shrink(self) -> None:
        """Keep the top l directions of the buffer, each shortened by the (l+1)-th's energy."""
        _, s, vt = torch.linalg.svd(self._b[:self._used], full_matrices=False)
        energy = s * s
        cut = energy[self.rows].item() if len(energy) > self.rows else 0.0
        keep = min(self.rows, len(energy))
        self._b.zero_()
        self._b[:keep] = (energy[:keep] - cut).clamp_min(0.0).sqrt()[:, None] * vt[:keep]
        self._used, self.shrunk = keep, self.shrunk + cut

    def factor(self) -> torch.Tensor:
        """B (m, d), B^T B standing for R^T R."""
        return self._b[:self._used]


def extend_basis(basis: Basis | None, stats: torch.Tensor | Sketch, threshold: float,
                 owner: str) -> tuple[Basis, float, float]:
    """The columns to add to `basis` (d, k) so that it captures `threshold` of the energy of the
    retained inputs, given as their Gram matrix (d, d) or a Sketch of them.

    Returns (added, captured_before, captured_after): `added` holds new orthonormal columns,
    orthogonal to `basis`, with the share of the inputs' energy (trace of the Gram matrix) each
    carries, owned by `owner`; the captured shares are those of span(basis) and of
    span(basis + added). A sketch's shares are lower bounds, as its directions' energy is.
    """
    d = stats.shape[0] if isinstance(stats, torch.Tensor) else stats.factor().shape[1]
    u = torch.zeros(d, 0, dtype=torch.float64) if basis is None else torch.from_numpy(basis.columns).double()
    total, kept, evals, evecs = _uncaptured(stats, u)
    if total <= 0.0:
        return Basis(np.zeros((d, 0)), np.zeros(0), []), 1.0, 1.0
    before = kept / total
    share = evals / total
    captured, m = before, 0
    while captured < threshold and m < min(len(share), d - u.shape[1]) and share[m] > 1e-12:
        captured += share[m].item()
        m += 1
    new = evecs[:, :m]
    if m:  # one more pass against U keeps the union orthonormal to rounding
        new = new - u @ (u.T @ new)
        new, _ = torch.linalg.qr(new)
    added = Basis(new.numpy(), share[:m].numpy(), [owner] * m)  # float64; the registry stores float32
    return added, before, captured


def _uncaptured(stats: torch.Tensor | Sketch, u: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(total energy, energy inside span(U), eigenvalues descending, eigenvectors) of what U does
    not capture of the inputs `stats` stands for."""
    if isinstance(stats, Sketch):
        b = stats.factor()  # (m, d)
        bu = b @ u
        _, s, vt = torch.linalg.svd(b - bu @ u.T, full_matrices=False)
        return stats.total, float((bu * bu).sum()), s * s, vt.T
    gram = stats.double()
    gu = gram @ u  # (d, k)
    evals, evecs = torch.linalg.eigh(_outside(gram, u, gu))  # ascending
    return torch.trace(gram).item(), torch.trace(u.T @ gu).item(), evals.flip(0).clamp_min(0.0), evecs.flip(1)


def _outside(gram: torch.Tensor, u: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """P G P with P = I - U U^T, for G (d, d) symmetric and U (d, k), GU = G @ U: what U does not
    capture, symmetrised. P is never formed: G - U (GU)^T - (GU) U^T + U (U^T G U) U^T, in one
    d x d buffer, each term added in place at O(d^2 k)."""
    out = (gram + gram.T) / 2
    if u.shape[1]:
        out.addmm_(u, gu.T, alpha=-1.0)
        out.addmm_(gu, u.T, alpha=-1.0)
        out.addmm_(u @ (u.T @ gu), u.T)
    return out


class NullSpace:
    """Projects LoRA A matrices onto the complement of span(U).

    When U holds more than half of the d directions, the complement V (d, d - k) is
    kept instead and A <- A V V^T is used: the same projection with fewer numbers
    (the DualGPM trick).
    """

    def __init__(self, basis: Basis):
        u = torch.from_numpy(basis.columns)  # (d, k)
        d, k = u.shape
        self.dim, self.rank = d, k
        self.complement = k > d // 2
        if self.complement:
            # the last d - k columns of a complete QR of U span its complement: no d x d projector, no eigh
            q, _ = torch.linalg.qr(u.double(), mode="complete")
            self.basis = q[:, k:].to(u.dtype)
        else:
            self.basis = u

    def project(self, a: torch.Tensor) -> torch.Tensor:
        v = self.basis.to(a.dtype)
        if self.complement:
            return (a @ v) @ v.T
        return project_out(a, v)
