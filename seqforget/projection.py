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
"""

import numpy as np
import torch

from registry import Basis


def project_out(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A (I - U U^T) for A (r, d) and orthonormal U (d, k), without forming the d x d projector."""
    return a - (a @ u) @ u.T


def extend_basis(basis: Basis | None, gram: torch.Tensor, threshold: float, owner: str) -> tuple[Basis, float, float]:
    """The columns to add to `basis` (d, k) so that it captures `threshold` of the energy of `gram` (d, d).

    Returns (added, captured_before, captured_after): `added` holds new orthonormal columns,
    orthogonal to `basis`, with the share of trace(gram) each carries, owned by `owner`;
    the captured shares are those of span(basis) and of span(basis + added).
    """
    gram = gram.double()
    d = gram.shape[0]
    u = torch.zeros(d, 0, dtype=torch.float64) if basis is None else torch.from_numpy(basis.columns).double()
    total = torch.trace(gram).item()
    if total <= 0.0:
        return Basis(np.zeros((d, 0)), np.zeros(0), []), 1.0, 1.0
    gu = gram @ u  # (d, k)
    before = torch.trace(u.T @ gu).item() / total
    residual = _outside(gram, u, gu)
    evals, evecs = torch.linalg.eigh(residual)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    share = evals / total
    captured, m = before, 0
    while captured < threshold and m < d - u.shape[1] and share[m] > 1e-12:
        captured += share[m].item()
        m += 1
    new = evecs[:, :m]
    if m:  # one more pass against U keeps the union orthonormal to rounding
        new = new - u @ (u.T @ new)
        new, _ = torch.linalg.qr(new)
    added = Basis(new.numpy(), share[:m].numpy(), [owner] * m)  # float64; the registry stores float32
    return added, before, captured


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
