"""The regularised least-squares edit shared by MACE's cross-attention refinement (CFR) and its LoRA fusion.

For one projection matrix ``W`` (``out x D``) it solves

    min_W  sum_i ||W e_i - v_i||^2  +  lam ||W - W_ref||^2  +  s sum_p ||W p - W_prior p||^2

whose normal equations are ``W M2 = M1`` with

    M1 = V^T E + lam W_ref + s W_prior C,     M2 = E^T E + lam I + s C,     C = sum_p p p^T.

- CFR: ``e_i`` are the concept prompts' non-concept token embeddings, ``v_i = W0 g_i`` the anchor's projections,
  ``W_ref = W_prior = W0``.
- Fusion: ``e_i`` all tokens of concept i's prompts, ``v_i = (W_cfr + dW_i) e_i``, ``W_ref = W_cfr``,
  ``W_prior = W0``.

``C`` depends only on the text encoder, so one ``D x D`` matrix serves every layer (the reference code caches two
matrices per layer). ``M2`` is symmetric positive definite for ``lam > 0``: we solve with a float64 Cholesky
factorisation and never form an explicit inverse. ``s`` multiplies ``C`` exactly once (the reference code applies it
twice).
"""

from __future__ import annotations

import torch


def normal_matrices(w_ref: torch.Tensor, e: torch.Tensor, v: torch.Tensor, lam: float, prior: torch.Tensor | None,
                    s: float, w_prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M1, M2)`` in float64. ``e``: [n, D] inputs, ``v``: [n, out] targets, ``prior``: [D, D] Gram matrix."""
    w_ref = w_ref.double()
    e, v = e.double(), v.double()
    d = w_ref.shape[1]
    if e.shape[1] != d or v.shape[1] != w_ref.shape[0] or e.shape[0] != v.shape[0]:
        raise ValueError(f"shape mismatch: W {tuple(w_ref.shape)}, inputs {tuple(e.shape)}, targets {tuple(v.shape)}")
    m1 = v.T @ e + lam * w_ref
    m2 = e.T @ e + lam * torch.eye(d, dtype=torch.float64, device=e.device)
    if prior is not None and s != 0:
        c = prior.double().to(e.device)
        wp = w_ref if w_prior is None else w_prior.double()
        m1 = m1 + s * (wp @ c)
        m2 = m2 + s * c
    return m1, m2


def factor(m2: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of ``M2`` (symmetric positive definite), to solve several right-hand sides with it."""
    m2 = (m2 + m2.T) / 2
    chol, info = torch.linalg.cholesky_ex(m2)
    if int(info) != 0:
        raise ValueError("the refinement system is not positive definite: increase the regulariser lam")
    return chol


def solve_factored(m1: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``W = M1 M2^-1`` given ``factor(M2)``."""
    return torch.cholesky_solve(m1.T.contiguous(), chol).T


def solve(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """``W = M1 M2^-1`` by Cholesky (``M2`` symmetric positive definite), in float64."""
    return solve_factored(m1, factor(m2))


def least_squares_edit(w_ref: torch.Tensor, e: torch.Tensor, v: torch.Tensor, lam: float,
                       prior: torch.Tensor | None = None, s: float = 0.0,
                       w_prior: torch.Tensor | None = None) -> torch.Tensor:
    """The minimiser ``W`` (float64); see the module docstring."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (got {lam})")
    return solve(*normal_matrices(w_ref, e, v, lam, prior, s, w_prior))
