"""Baseline solvers on synthetic least-squares problems where the optimum on a mask is known exactly."""

import pytest
import torch

from conftest import correlated_problem
from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.masks import is_nm
from lmprune.solvers import build_layer_solver, method_names
from lmprune.solvers.linalg import exact_masked_optimum, relative_error


@pytest.fixture(scope="module")
def problem():
    return correlated_problem()


def errors(problem, pattern):
    W, H = problem
    return {m: relative_error(W, build_layer_solver(m)(W, H, pattern).weight, H) for m in ("magnitude", "wanda", "sparsegpt")}


@pytest.mark.parametrize("pattern", [SparsityPattern(0.5), SparsityPattern(0.7), SparsityPattern.nm("2:4")],
                         ids=["50%", "70%", "2:4"])
def test_error_ordering_sparsegpt_wanda_magnitude(problem, pattern):
    e = errors(problem, pattern)
    assert e["sparsegpt"] < e["wanda"] < e["magnitude"], e


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.73])
def test_exact_counts(problem, method, sparsity):
    W, H = problem
    for per_row in (False, True):
        r = build_layer_solver(method)(W, H, SparsityPattern(sparsity, per_row=per_row))
        zeros = (r.weight == 0)
        assert torch.equal(zeros, ~r.mask)
        if per_row:
            assert (zeros.sum(1) == int(W.shape[1] * sparsity)).all()
        else:
            assert int(zeros.sum()) == int(W.numel() * sparsity)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_valid(problem, method, nm):
    W, H = problem
    pattern = SparsityPattern.nm(nm)
    r = build_layer_solver(method)(W, H, pattern)
    assert is_nm(r.weight != 0, pattern.n, pattern.m)
    assert int((r.weight == 0).sum()) == W.numel() * (pattern.m - pattern.n) // pattern.m


def test_sparsegpt_update_on_fixed_mask_improves_masked_weights(problem):
    W, H = problem
    wanda = build_layer_solver("wanda")(W, H, SparsityPattern(0.5))
    updated = build_layer_solver(mask="wanda", update="sparsegpt")(W, H, SparsityPattern(0.5))
    assert torch.equal(updated.mask, wanda.mask)
    exact = relative_error(W, exact_masked_optimum(W, H, wanda.mask), H)
    e_update = relative_error(W, updated.weight, H)
    assert exact <= e_update < relative_error(W, wanda.weight, H)
    assert not updated.weight[~wanda.mask].any()


def test_exact_masked_optimum_satisfies_normal_equations(problem):
    W, H = problem
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    opt = exact_masked_optimum(W, H, mask)
    grad = (opt - W).double() @ H.double()  # gradient of the objective, up to a factor 2
    assert grad[mask].abs().max() < 1e-6 * grad.abs().max()
    # and it beats any perturbation on the support
    bumped = opt + 0.01 * torch.randn_like(opt) * mask
    assert relative_error(W, opt, H) < relative_error(W, bumped, H)


def test_dead_inputs_are_handled():
    W, H = correlated_problem(rows=16, cols=64, tokens=256)
    H[:, 5] = 0
    H[5, :] = 0
    r = build_layer_solver("sparsegpt")(W, H, SparsityPattern(0.5))
    assert torch.isfinite(r.weight).all()
    assert int((r.weight == 0).sum()) == W.numel() // 2


def test_registry_lists_baselines():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(method_names())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "sparsegpt", "options": {"blocksize": "x"}}, "expected int"),
        ({"method": "sparsegpt", "options": {"bogus": "1"}}, "unknown option"),
        ({"method": "sparsegpt", "options": {"dampening": "2"}}, "dampening"),
        ({"mask": "wanda", "update": "magnitude"}, "cannot update"),
        ({}, "no method"),
    ],
)
def test_bad_solver_settings(kwargs, message):
    with pytest.raises(LmpruneError, match=message):
        build_layer_solver(**kwargs)


def test_reported_errors_match_float64_reference(problem):
    """The pipeline's float32 report of several candidates agrees with the float64 reference."""
    from lmprune.solvers.linalg import relative_errors

    W, H = problem
    candidates = [build_layer_solver(m)(W, H, SparsityPattern(0.6)).weight for m in ("magnitude", "sparsegpt")]
    reported = relative_errors(W, candidates, H)
    for got, candidate in zip(reported, candidates):
        assert got == pytest.approx(relative_error(W, candidate, H), rel=1e-4)
    assert relative_errors(W, [W], H) == [0.0]


@pytest.mark.parametrize("rows, width", [(300, 96), (2100, 64)])
def test_reported_errors_in_row_blocks_are_the_stacked_products_bits(rows, width, monkeypatch):
    """The error report multiplies a block of rows at a time (issue #30's memory): the same numbers, bit for
    bit, as the one product of the stacked differences it replaced."""
    from lmprune.solvers import linalg

    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(rows, width, generator=g), torch.randn(500, width, generator=g)
    H = X.t() @ X
    candidates = [W * (torch.rand(rows, width, generator=g) > p) for p in (0.5, 0.7)]
    stacked = torch.cat([W, *[W - c for c in candidates]])
    quad = (stacked @ H).mul_(stacked).sum(1, dtype=torch.float64).split(rows)
    expected = [float(q.sum()) / float(quad[0].sum()) for q in quad[1:]]
    monkeypatch.setattr(linalg, "_REPORT_BYTES", 4 * width * 128)  # 128 rows a block: several, one partial
    assert linalg.relative_errors(W, candidates, H) == expected


def test_damping_and_inverse_factor_are_bit_identical_to_the_textbook_forms():
    """add_damping and SparseGPT's inverse Cholesky factor avoid n×n temporaries (issue #30): the same bits as
    H + damp·I with an explicit identity and as factorising every matrix into a preallocated output."""
    from lmprune.solvers.linalg import add_damping
    from lmprune.solvers.sparsegpt import _inverse_cholesky

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 24, generator=g)
    H = X.mT @ X
    H[0, 1, 2] = H[0, 2, 1] = -0.0  # the sign of a zero survives neither form differently
    damp = 0.01 * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    reference = H + damp[..., None, None] * torch.eye(24)
    damped = add_damping(H, 0.01)
    assert torch.equal(damped.view(torch.int32), reference.view(torch.int32))

    def textbook(H):  # the implementation before: a preallocated output, the factors copied into it
        out, index = torch.empty_like(H), torch.arange(H.shape[0])
        L, info = torch.linalg.cholesky_ex(H[index])
        U, info_upper = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        ok = (info == 0) & (info_upper == 0)
        out[index[ok]] = U[ok]
        return out

    in_place = H.clone()
    assert add_damping(in_place, 0.01, in_place=True) is in_place
    assert torch.equal(in_place.view(torch.int32), reference.view(torch.int32))
    U = _inverse_cholesky(lambda: damped.clone())
    assert U.is_contiguous() and torch.equal(U.view(torch.int32), textbook(damped).view(torch.int32))
    bad = damped.clone()
    bad[1] = torch.diag(torch.tensor([1.0] * 23 + [-1.0]))  # not positive definite, in float64 either
    with pytest.raises(torch.linalg.LinAlgError):
        _inverse_cholesky(lambda: bad.clone())
    # One matrix positive definite in float64 only: the float64 pass factorises it from a fresh H.
    near = damped.clone()
    Q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    near[2] = ((Q * torch.logspace(0, -8.5, 24, dtype=torch.float64)) @ Q.T).float()  # condition number 3e8
    assert torch.linalg.cholesky_ex(near[2])[1] != 0 and torch.linalg.cholesky_ex(near[2].double())[1] == 0
    mixed = _inverse_cholesky(lambda: near.clone())
    ok = textbook(near)
    assert torch.equal(mixed[:2].view(torch.int32), ok[:2].view(torch.int32))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(near[2].double())), upper=True)
    assert torch.equal(mixed[2], expected.float())


@pytest.mark.parametrize("n", [7, 300, 600])
def test_inverse_factor_in_place_matches_fresh_tensors(n):
    """On the CPU SparseGPT factorises H⁻¹ in H's own memory (issue #30): the same bits as the fresh-tensor
    chain, for matrices spanning several transposition tiles (256) and not symmetric to the bit."""
    from lmprune.solvers.sparsegpt import _inverse_cholesky, _transpose_in_place

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2, 2 * n, n, generator=g)
    H = X.mT @ X + torch.eye(n)
    H[:, 0, 1] += 1e-3  # asymmetric: the factorisation reads H's lower triangle, as a fresh tensor's does
    L, _ = torch.linalg.cholesky_ex(H)
    expected = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)[0].contiguous()
    U = _inverse_cholesky(lambda: H.clone())
    assert U.is_contiguous() and torch.equal(U.view(torch.int32), expected.view(torch.int32))
    M = torch.randn(3, n, n, generator=g)
    T = M.clone()
    _transpose_in_place(T, tile=64)
    assert torch.equal(T, M.mT)



@pytest.mark.parametrize("method", sorted(__import__("lmprune.solvers", fromlist=["SOLVERS"]).SOLVERS))
def test_solvers_never_write_into_their_inputs(method):
    """The pipeline hands a solver the layer's stored weight itself where it is float32 (no copy beside it,
    issue #30), so no solver, update or refit may write into W, H or the input statistics."""
    from lmprune.solvers import SOLVERS

    W, H, stats = correlated_problem(rows=32, cols=64, tokens=512, with_stats=True)
    copies = W.clone(), H.clone(), stats.total.clone()
    solver = SOLVERS[method]
    pattern = SparsityPattern(0.5)
    if solver.solve is not None:
        options = ({"iterations": 6, **({"gradual_steps": 3} if method == "admm-grad" else {})} if method.startswith("admm")
                   else {"max_iterations": 5, "min_iterations": 2} if method == "alps" else {})
        layer_solver = build_layer_solver(method, options=options, refine="swaps" if method == "wanda" else None)
        layer_solver(W, H, pattern, stats)
    if solver.update is not None:
        settings = solver.settings(**({"iterations": 6} if method in ("admm", "gd") else {}))
        solver.update(W, H, W.abs() > W.abs().median(), settings)
    for before, after in zip(copies, (W, H, stats.total)):
        assert torch.equal(before, after)


def test_sparsegpt_overwriting_the_gram_gives_the_same_bits():
    """Where memory is short SparseGPT factorises XᵀX in its own memory (`solve_taking`): the same weights and
    mask as `solve`, also when float32 fails and `reload` gives XᵀX again for the float64 pass."""
    from lmprune.solvers import SOLVERS

    sparsegpt = SOLVERS["sparsegpt"]
    W, H = correlated_problem(rows=48, cols=96, tokens=1024)
    Q, _ = torch.linalg.qr(torch.randn(96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    near = ((Q * torch.logspace(0, -8.5, 96, dtype=torch.float64)) @ Q.T).float()  # factorisable in float64 only
    assert torch.linalg.cholesky_ex(near)[1] != 0 and torch.linalg.cholesky_ex(near.double())[1] == 0
    undamped = sparsegpt.settings(dampening=0.0)
    for gram, pattern, settings in ((H, SparsityPattern(0.6), sparsegpt.settings()),
                                    (H, SparsityPattern.nm("2:4"), sparsegpt.settings()),
                                    (near, SparsityPattern(0.5), undamped)):
        expected = sparsegpt.solve(W, gram, pattern, settings)
        reloads = []

        def reload():
            reloads.append(1)
            return gram.clone()

        given = gram.clone()
        got = sparsegpt.solve_taking(W, given, pattern, settings, reload)
        assert torch.equal(got.weight.view(torch.int32), expected.weight.view(torch.int32))
        assert torch.equal(got.mask, expected.mask)
        assert len(reloads) == (1 if gram is near else 0)
        assert not torch.equal(given, gram)  # it did overwrite: the memory was the factor's
