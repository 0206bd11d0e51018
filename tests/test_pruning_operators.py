"""Magnitude, Wanda and SparseGPT against their definitions, on small matrices."""
import pytest
import torch

from efficientllava.pruning.operators import (
    Target,
    inverse_hessian_factor,
    magnitude,
    parse_target,
    prune_weight,
    sparsegpt,
    wanda,
)


def calibration(cols=8, tokens=64, seed=0):
    """Correlated inputs X (tokens, cols) with uneven column scales, and their stats."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    X = X * torch.linspace(0.2, 3.0, cols)
    return X, {"sq_norms": X.pow(2).sum(0), "hessian": X.T @ X / tokens}


def weight(rows=4, cols=8, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def prune_by_definition(W, scores, k):
    """Loop over rows: zero the k lowest-scoring weights of each row."""
    out = W.clone()
    for i in range(W.shape[0]):
        order = sorted(range(W.shape[1]), key=lambda j: float(scores[i, j]))
        for j in order[:k]:
            out[i, j] = 0
    return out


def test_magnitude_definition():
    W = weight()
    pruned, keep = magnitude(W, 0.5)
    assert torch.equal(pruned, prune_by_definition(W, W.abs(), 4))
    assert torch.equal(keep, pruned != 0)


def test_wanda_definition():
    W = weight()
    X, stats = calibration()
    scores = torch.tensor([[abs(float(W[i, j])) * float(X[:, j].norm()) for j in range(8)] for i in range(4)])
    pruned, _ = wanda(W, 0.25, stats)
    assert torch.equal(pruned, prune_by_definition(W, scores, 2))


def test_sparsegpt_ratio_zero_leaves_weight_unchanged():
    W = weight()
    _, stats = calibration()
    pruned, keep = sparsegpt(W, 0.0, stats)
    assert torch.equal(pruned, W) and keep.all()
    pruned, _ = sparsegpt(W, 0.05, stats)  # round(0.05 * 8) = 0 weights per row
    assert torch.equal(pruned, W)


def test_sparsegpt_matches_brute_force_obs_step():
    """One weight per row pruned: the choice and the update are those of OBS given the columns already fixed."""
    W = weight(rows=6, cols=8)
    _, stats = calibration(cols=8)
    damp = 0.01
    H = stats["hessian"].double()
    H = H + damp * H.diag().mean() * torch.eye(8, dtype=H.dtype)
    pruned, keep = sparsegpt(W, 1 / 8, stats, damp=damp)
    for i in range(W.shape[0]):
        w = W[i].double()
        # brute force: for every candidate column q, the least squares cost of zeroing w_q while columns < q stay
        # fixed and columns > q move freely: min over delta of delta^T H delta with delta_q = -w_q
        best = None
        for q in range(8):
            free = list(range(q + 1, 8))
            delta = torch.zeros(8, dtype=H.dtype)
            delta[q] = -w[q]
            if free:
                delta[free] = torch.linalg.solve(H[free][:, free], -H[free, q] * delta[q])
            cost = float(delta @ H @ delta)
            if best is None or cost < best[0]:
                best = (cost, q, w + delta)
        _, q, expected = best
        assert torch.equal(~keep[i], torch.nn.functional.one_hot(torch.tensor(q), 8).bool())
        torch.testing.assert_close(pruned[i].double(), expected, atol=1e-4, rtol=1e-4)


def test_sparsegpt_first_column_is_plain_obs():
    """Pruning column 0 (nothing fixed before it) gives the textbook OBS update -w_q / [H^-1]_qq * H^-1[:, q]."""
    W = weight(rows=1, cols=8)
    _, stats = calibration(cols=8)
    U, dead = inverse_hessian_factor(stats["hessian"])
    W[0, 0] = 1e-4  # the least salient weight by far
    pruned, keep = sparsegpt(W, 1 / 8, factor=(U, dead))
    assert not keep[0, 0] and keep[0, 1:].all()
    H = stats["hessian"].double()
    Hinv = torch.linalg.inv(H + 0.01 * H.diag().mean() * torch.eye(8, dtype=H.dtype))
    expected = W[0].double() - W[0, 0].double() / Hinv[0, 0] * Hinv[:, 0]
    torch.testing.assert_close(pruned[0].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("ratio", [0.1, 0.35, 0.5, 0.77, 0.9])
def test_exact_sparsity_per_row(method, ratio):
    W = weight(rows=5, cols=40)
    _, stats = calibration(cols=40, tokens=200)
    pruned, keep = prune_weight(method, W, ratio, stats, blocksize=16)  # several blocks for sparsegpt
    k = round(ratio * 40)
    assert ((pruned == 0).sum(1) == k).all() and ((~keep).sum(1) == k).all()
    assert torch.equal(pruned == 0, ~keep)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_pattern_holds(method, pattern):
    n, m = map(int, pattern.split(":"))
    W = weight(rows=6, cols=32)
    _, stats = calibration(cols=32, tokens=200)
    pruned, keep = prune_weight(method, W, pattern, stats)
    groups = (pruned != 0).reshape(6, 32 // m, m).sum(-1)
    assert (groups == n).all()
    assert torch.equal(keep, pruned != 0)


def test_sparsegpt_dead_inputs_are_pruned_first():
    W = weight(rows=3, cols=8)
    _, stats = calibration(cols=8)
    H = stats["hessian"].clone()
    H[2, :] = 0
    H[:, 2] = 0  # input 2 was always zero
    pruned, keep = sparsegpt(W, 1 / 8, {"hessian": H})
    assert (~keep[:, 2]).all() and keep[:, [0, 1, 3, 4, 5, 6, 7]].all()
    assert torch.equal(pruned[:, [0, 1, 3, 4, 5, 6, 7]], W[:, [0, 1, 3, 4, 5, 6, 7]])  # free: nothing to compensate
    unchanged, _ = sparsegpt(W, 0.0, {"hessian": H})
    assert torch.equal(unchanged, W)


def test_input_is_not_modified_and_dtype_kept():
    W = weight(rows=4, cols=16).to(torch.bfloat16)
    before = W.clone()
    _, stats = calibration(cols=16)
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned, _ = prune_weight(method, W, 0.5, stats)
        assert pruned.dtype == torch.bfloat16
        assert torch.equal(W, before)


def test_parse_target():
    assert parse_target(0.5) == Target(0.5)
    assert parse_target("0.25") == Target(0.25)
    assert parse_target("2:4") == Target(0.5, 2, 4)
    assert str(parse_target("4:8")) == "4:8" and str(parse_target(0.30000000000000004)) == "0.3"
    for bad, message in [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), (float("nan"), r"\[0, 1\)"),
                         ("half", "N:M pattern"), (True, "expected a ratio"), ("5:4", "0 < N <= M"),
                         (None, "expected a ratio")]:
        with pytest.raises(ValueError, match=message):
            parse_target(bad, layer="model.language_model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="layers.3.mlp.up_proj"):
        parse_target(1.2, layer="model.language_model.layers.3.mlp.up_proj")


def test_operator_errors():
    W = weight(rows=4, cols=10)
    _, stats = calibration(cols=10)
    with pytest.raises(ValueError, match="10 input features.*multiple of M=4"):
        magnitude(W, "2:4")
    with pytest.raises(ValueError, match="wanda needs calibration statistics with 'sq_norms'"):
        wanda(W, 0.5, None)
    with pytest.raises(ValueError, match="sparsegpt needs calibration statistics with 'hessian'"):
        sparsegpt(W, 0.5, {})
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        wanda(W, 0.5, {"sq_norms": torch.ones(7)})
    with pytest.raises(ValueError, match="pruning method 'obs' is unknown"):
        prune_weight("obs", W, 0.5, stats)
    with pytest.raises(ValueError, match="blocksize is 6; expected a positive multiple of M=4"):
        sparsegpt(weight(4, 8), "2:4", calibration()[1], blocksize=6)
    bad = torch.full((10, 10), float("nan"))
    with pytest.raises(torch.linalg.LinAlgError, match="layer 'x'.*not positive definite"):
        inverse_hessian_factor(bad, layer="x")
