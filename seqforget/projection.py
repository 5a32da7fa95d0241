"""Null-space bases and projections. Pure maths: no I/O, no model.

For a linear layer y = W x with input dimension d, U (d, k) is an orthonormal basis
of the inputs that retained knowledge sends through the layer. A LoRA update
dW = B A (A is r x d) leaves every retained input untouched when A U = 0:

    A <- A (I - U U^T)                                         (project_out)

Bases grow as in Gradient Projection Memory (Saha et al., 2021): given the Gram
matrix G = R^T R of new retained inputs R (n, d), the part U does not capture is
P G P with P = I - U U^T; its top eigenvectors are added until the captured share
of trace(G) reaches the threshold.
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
    before = torch.trace(u.T @ gram @ u).item() / total
    p = torch.eye(d, dtype=torch.float64) - u @ u.T
    residual = p @ gram @ p
    evals, evecs = torch.linalg.eigh((residual + residual.T) / 2)  # ascending
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
            # eigenvectors of I - U U^T with eigenvalue 1 span the complement
            evals, evecs = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - u.double() @ u.double().T)
            self.basis = evecs[:, evals > 0.5].to(u.dtype)
        else:
            self.basis = u

    def project(self, a: torch.Tensor) -> torch.Tensor:
        v = self.basis.to(a.dtype)
        if self.complement:
            return (a @ v) @ v.T
        return project_out(a, v)
