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
of rank s stands for it, G_hat = F F^T with F (d, s), and what U does not capture is
then read off the singular vectors of F - U (U^T F), at O(d s k + d s^2). A `Factor` gives
inputs by such an F directly: other bases' columns, each weighted by the energy it carries.
"""

import numpy as np
import torch

from registry import Basis

SKETCH_RANK = 1024  # layers wider than twice this keep a Sketch of this rank of their retained inputs, not a Gram matrix


def project_out(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A (I - U U^T) for A (r, d) and orthonormal U (d, k), without forming the d x d projector."""
    return a - (a @ u) @ u.T


class Sketch:
    """A randomised Nystrom sketch of G = R^T R for rows R (n, d) added in batches (Tropp,
    Yurtsever, Udell and Cevher, 2017): Y = G Omega for a fixed orthonormal Omega (d, s), grown
    by R^T (R Omega) per batch (two GEMMs, no decomposition) in O(d s) memory. It stands for

        G_hat = Y (Omega^T Y)^+ Y^T,   0 <= G_hat <= G (positive semidefinite order),

    exact when the inputs have rank at most s, and in expectation within a factor
    1 + j / (s - j - 1) of the trace of G's tail beyond its top j directions otherwise.
    `total` is trace(G), exactly. Omega is drawn from a seeded generator: the same inputs give
    the same sketch; sketches of one width may share it (`sketch_directions`)."""

    def __init__(self, dim: int, rank: int, omega: torch.Tensor | None = None):
        self.omega = sketch_directions(dim, rank) if omega is None else omega  # (d, s), on the CPU as Y is
        self._omega = self.omega
        self.y = torch.zeros(dim, rank, dtype=torch.float64)  # G Omega
        self.total = 0.0

    @property
    def dim(self) -> int:
        return self.y.shape[0]

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x (n, d)."""
        x = x.double()
        if self._omega.device != x.device:
            self._omega = self.omega.to(x.device)  # a copy where the inputs are, made once
        self.total += float((x * x).sum())
        self.y += (x.T @ (x @ self._omega)).cpu()

    def factor(self) -> torch.Tensor:
        """F (d, m) with F F^T = G_hat, m <= s (Tropp et al.'s stable Algorithm 3: a tiny shift
        nu keeps the Cholesky factor defined and is taken off again)."""
        norm = torch.linalg.matrix_norm(self.y, 2).item()
        if norm == 0.0:
            return self.y[:, :0]
        nu = self.y.shape[0] ** 0.5 * torch.finfo(torch.float64).eps * norm
        y = self.y + nu * self.omega
        core = self.omega.T @ y
        c = torch.linalg.cholesky((core + core.T) / 2)  # lower triangular, (s, s)
        f = torch.linalg.solve_triangular(c, y.T, upper=False).T  # Y C^-T: F F^T = Y (Omega^T Y)^-1 Y^T
        u, sv, _ = torch.linalg.svd(f, full_matrices=False)
        energy = (sv * sv - nu).clamp_min(0.0)
        keep = energy > 0
        return u[:, keep] * energy[keep].sqrt()


class Factor:
    """Inputs given by a factor F (d, m) of their Gram matrix, G = F F^T."""

    def __init__(self, f: torch.Tensor):
        self.f = f.double()
        self.dim = f.shape[0]
        self.total = float((self.f * self.f).sum())

    @classmethod
    def of(cls, parts: list[Basis]) -> "Factor":
        """The inputs that bases stand for: each column weighted by the square root of its energy."""
        return cls(torch.cat([torch.from_numpy(p.columns).double() * torch.from_numpy(p.energy).double().sqrt()
                              for p in parts], dim=1))

    def factor(self) -> torch.Tensor:
        return self.f


def sketch_directions(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Omega (d, s): orthonormal columns of a seeded Gaussian matrix."""
    omega = torch.randn(dim, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(omega)[0]


def extend_basis(basis: Basis | None, stats: torch.Tensor | Sketch | Factor, threshold: float,
                 owner: str) -> tuple[Basis, float, float]:
    """The columns to add to `basis` (d, k) so that it captures `threshold` of the energy of the
    retained inputs, given as their Gram matrix (d, d), a Sketch or a Factor of them.

    Returns (added, captured_before, captured_after): `added` holds new orthonormal columns,
    orthogonal to `basis`, with the share of the inputs' energy (trace of the Gram matrix) each
    carries, owned by `owner`; the captured shares are those of span(basis) and of
    span(basis + added). A sketch's shares are lower bounds, as its directions' energy is.
    """
    d = stats.shape[0] if isinstance(stats, torch.Tensor) else stats.dim
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


def _uncaptured(stats: torch.Tensor | Sketch | Factor,
                u: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(total energy, energy inside span(U), eigenvalues descending, eigenvectors) of what U does
    not capture of the inputs `stats` stands for."""
    if not isinstance(stats, torch.Tensor):
        f = stats.factor()  # (d, m): G_hat = F F^T
        uf = u.T @ f  # (k, m)
        left, s, _ = torch.linalg.svd(f - u @ uf, full_matrices=False)  # P F = P G_hat P's square root
        return stats.total, float((uf * uf).sum()), s * s, left
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
        self._on = self.basis

    def project(self, a: torch.Tensor) -> torch.Tensor:
        if (self._on.device, self._on.dtype) != (a.device, a.dtype):
            self._on = self.basis.to(a)  # a copy where the update is, made once
        v = self._on
        if self.complement:
            return (a @ v) @ v.T
        return project_out(a, v)
