import pytest
import torch

from erasure.closed_form import least_squares_edit, normal_matrices


def _problem(seed=0, n=12, d=16, out=8):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, out, generator=g, dtype=torch.float64)
    p = torch.randn(50, d, generator=g, dtype=torch.float64)
    return w0, e, v, p.T @ p


def test_solution_satisfies_its_normal_equations():
    w0, e, v, c = _problem()
    w = least_squares_edit(w0, e, v, lam=0.1, prior=c, s=0.5)
    m1, m2 = normal_matrices(w0, e, v, 0.1, c, 0.5)
    torch.testing.assert_close(w @ m2, m1, rtol=1e-9, atol=1e-9)


def test_solution_is_the_minimiser():
    w0, e, v, c = _problem(1)
    w = least_squares_edit(w0, e, v, lam=0.3, prior=c, s=0.2)

    def objective(m):
        return ((e @ m.T - v) ** 2).sum() + 0.3 * ((m - w0) ** 2).sum() + 0.2 * torch.trace((m - w0) @ c @ (m - w0).T)

    base = objective(w)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        assert objective(w + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)) > base


def test_no_constraints_leave_weights_unchanged():
    w0, _, _, c = _problem()
    empty = torch.zeros(0, w0.shape[1], dtype=torch.float64)
    w = least_squares_edit(w0, empty, torch.zeros(0, w0.shape[0], dtype=torch.float64), lam=0.5, prior=c, s=1.0)
    torch.testing.assert_close(w, w0, rtol=1e-10, atol=1e-10)


def test_prior_weight_enters_once():
    w0, e, v, c = _problem()
    m1, m2 = normal_matrices(w0, e, v, 0.1, c, 2.0)
    m1b, m2b = normal_matrices(w0, e, v, 0.1, None, 0.0)
    torch.testing.assert_close(m2 - m2b, 2.0 * c)
    torch.testing.assert_close(m1 - m1b, 2.0 * (w0 @ c))


def test_rejects_bad_regulariser_and_shapes():
    w0, e, v, c = _problem()
    with pytest.raises(ValueError):
        least_squares_edit(w0, e, v, lam=0.0)
    with pytest.raises(ValueError):
        least_squares_edit(w0, e[:, :3], v, lam=0.1)
