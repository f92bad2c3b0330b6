"""SparseGradLinear against an independent dense reference: autograd on the unrotated nn.Linear."""

import copy

import pytest
import torch
from torch import nn

import sparsegrad as sg
from sparsegrad.layer import rotated_to_weight
from sparsegrad.support_gradient import SupportGradient


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def make_pair(out_f=12, in_f=8, bias=True, support="dynamic", k=10, seed=0, dtype=torch.float32, identity=False):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    u_out = torch.eye(out_f) if identity else orthogonal(out_f, seed + 1)
    u_in = torch.eye(in_f) if identity else orthogonal(in_f, seed + 2)
    layer = sg.SparseGradLinear(copy.deepcopy(ref), u_out, u_in, k=k, support=support, kind="k",
                                identity_basis=identity)
    return ref, layer, u_out, u_in


def run(module, x, gy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 8), (3, 5, 8)])
def test_exact_at_conversion(support, bias, shape):
    ref, layer, u_out, u_in = make_pair(bias=bias, support=support)
    x = torch.randn(*shape)
    gy = torch.randn(*shape[:-1], 12)
    y_ref, gx_ref = run(ref, x, gy)
    y, gx = run(layer, x, gy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    g_ref = ref.weight.grad
    rotated_ref = u_out.T @ g_ref @ u_in
    if bias:
        # bias gradient in the ORIGINAL space: Σ over batch and tokens of ∂L/∂Y (the official code rotates it)
        torch.testing.assert_close(layer.bias.grad, gy.reshape(-1, 12).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(layer.bias.grad, ref.bias.grad @ u_out, atol=1e-3)
    if support == "dynamic":
        torch.testing.assert_close(layer.weight.grad, g_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.rotate(layer.weight.grad), rotated_ref, rtol=1e-5, atol=1e-5)
    else:
        # the first step chooses the support: the top-k of |rotated gradient|
        expected = torch.topk(rotated_ref.abs().flatten(), layer.k).indices.sort().values
        assert torch.equal(layer.delta_indices, expected)
        torch.testing.assert_close(layer.delta_values.grad, rotated_ref.flatten()[expected], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("identity", [False, True])
def test_fixed_support_gradient_at_known_support(identity):
    ref, layer, u_out, u_in = make_pair(support="fixed", k=20, identity=identity)
    layer.delta_indices = torch.tensor(sorted(torch.randperm(96)[:20].tolist()))
    x, gy = torch.randn(3, 6, 8), torch.randn(3, 6, 12)
    gy[0, 4:] = 0  # padded tokens: zero output-gradient rows are skipped
    run(ref, x, gy)
    run(layer, x, gy)
    expected = (u_out.T @ ref.weight.grad @ u_in).flatten()[layer.delta_indices]
    torch.testing.assert_close(layer.delta_values.grad, expected, rtol=1e-5, atol=1e-5)


def test_fixed_support_via_token_route_matches():
    # Few tokens: the layer takes the (gy U_out)ᵀ (x U_in) route; the result must not depend on the route.
    ref, layer, u_out, u_in = make_pair(out_f=40, in_f=30, support="fixed", k=30)
    layer.delta_indices = torch.tensor(sorted(torch.randperm(1200)[:30].tolist()))
    x, gy = torch.randn(2, 30), torch.randn(2, 40)
    run(ref, x, gy)
    run(layer, x, gy)
    expected = (u_out.T @ ref.weight.grad @ u_in).flatten()[layer.delta_indices]
    torch.testing.assert_close(layer.delta_values.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ["all", "few", "most"])
@pytest.mark.parametrize("tokens", [2, 64])  # the (gy U_out)ᵀ (x U_in) route and the dense route
def test_fixed_support_gradient_whatever_rows_it_spans(rows, tokens):
    # The support's basis columns are kept as the basis itself (all rows) or gathered per step (few, most): the
    # gradient must be the same in each case, and no copy of the basis is held between steps.
    ref, layer, u_out, u_in = make_pair(out_f=40, in_f=30, support="fixed", k=40)
    row_list = list({"all": range(40), "few": range(0, 40, 4), "most": range(30)}[rows])
    n = len(row_list)
    picks = {row_list[j % n] * 30 + (7 * j + j // n) % 30 for j in range(40)}
    assert len(picks) == 40 and {p // 30 for p in picks} == set(row_list)
    layer.delta_indices = torch.tensor(sorted(picks))
    x, gy = torch.randn(tokens, 30), torch.randn(tokens, 40)
    run(ref, x, gy)
    run(layer, x, gy)
    expected = (u_out.T @ ref.weight.grad @ u_in).flatten()[layer.delta_indices]
    torch.testing.assert_close(layer.delta_values.grad, expected, rtol=1e-5, atol=1e-5)
    left = layer._plan.left
    if rows == "all":
        assert left is layer.u_out  # the shared basis itself, no copy
    else:
        assert left is None  # 10 or 30 of 40 columns: gathered when needed, not held


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
@pytest.mark.parametrize("spread", ["all", "few rows", "few columns"])
@pytest.mark.parametrize("route", SupportGradient.ROUTES)
def test_every_support_gradient_route_matches_the_dense_reference(route, spread, shape):
    # Each cut of the chain u_outᵀ gyᵀ x u_in, sampled at the support, against autograd's G on the unrotated layer.
    out_f, in_f = shape
    ref, layer, u_out, u_in = make_pair(out_f=out_f, in_f=in_f, support="fixed", k=36)
    g = torch.Generator().manual_seed(3)
    rows = {"all": out_f, "few rows": 4, "few columns": out_f}[spread]
    cols = {"all": in_f, "few rows": in_f, "few columns": 3}[spread]
    cells = torch.randperm(rows * cols, generator=g)[:36]
    row_step, col_step = out_f // rows, in_f // cols
    picks = sorted(int(r) * row_step * in_f + int(c) * col_step for r, c in zip(cells // cols, cells % cols))
    layer.delta_indices = torch.tensor(picks, dtype=torch.int32)
    x, gy = torch.randn(5, 7, in_f), torch.randn(5, 7, out_f)
    run(ref, x, gy)
    expected = (u_out.T @ ref.weight.grad @ u_in).flatten()[layer.delta_indices.long()]
    got = layer._support_plan()(x.reshape(-1, in_f), gy.reshape(-1, out_f), route)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_delta_maps_back_through_the_bases():
    _, layer, u_out, u_in = make_pair(support="fixed", k=15)
    idx = torch.tensor(sorted(torch.randperm(96)[:15].tolist()))
    vals = torch.randn(15)
    dense = torch.zeros(96)
    dense[idx] = vals
    expected = u_out @ dense.view(12, 8) @ u_in.T
    torch.testing.assert_close(rotated_to_weight(idx, vals, u_out, u_in, (12, 8)), expected, rtol=1e-5, atol=1e-6)
    layer.delta_indices = idx
    with torch.no_grad():
        layer.delta_values.copy_(vals)
    layer.sync_weight()
    torch.testing.assert_close(layer.weight, layer.base_weight + expected, rtol=1e-5, atol=1e-6)
    # rotating the trained weight's change gives back exactly the k entries
    rotated = u_out.T @ (layer.weight - layer.base_weight) @ u_in
    torch.testing.assert_close(rotated.flatten()[idx], vals, rtol=1e-4, atol=1e-5)
    mask = torch.ones(96, dtype=torch.bool)
    mask[idx] = False
    assert rotated.flatten()[mask].abs().max() < 1e-5


def test_topk_is_exact_by_magnitude_with_deterministic_ties():
    scores = torch.tensor([0.5, -3.0, 1.0, 1.0, 1.0, -1.0, 0.0, 2.0])
    idx = sg.topk_indices(scores, 4)
    # |-3| and |2| first, then ties at |1|: the lowest indices win
    assert idx.tolist() == [1, 2, 3, 7]
    assert sg.topk_indices(torch.zeros(10), 3).tolist() == [0, 1, 2]
    big = torch.randn(1000)
    idx = sg.topk_indices(big, 37)
    assert idx.numel() == 37 and idx.unique().numel() == 37
    assert big.abs()[idx].min() >= big.abs()[~torch.isin(torch.arange(1000), idx)].max()


def test_bf16_weights_with_fp32_bases_exact_at_conversion():
    ref, layer, u_out, u_in = make_pair(dtype=torch.bfloat16)
    assert layer.u_out.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_layer_argument_errors():
    lin = nn.Linear(8, 12)
    with pytest.raises(ValueError, match="do not fit"):
        sg.SparseGradLinear(lin, torch.eye(8), torch.eye(8), k=3, support="dynamic", kind="x")
    with pytest.raises(ValueError, match="k=0"):
        sg.SparseGradLinear(lin, torch.eye(12), torch.eye(8), k=0, support="dynamic", kind="x")
    with pytest.raises(ValueError, match="support mode"):
        sg.SparseGradLinear(lin, torch.eye(12), torch.eye(8), k=3, support="sometimes", kind="x")
    with pytest.raises(ValueError, match="nn.Linear"):
        sg.SparseGradLinear(nn.Conv1d(2, 2, 1), torch.eye(2), torch.eye(2), k=1, support="dynamic", kind="x")
    with pytest.raises(ValueError, match="needs 3 indices"):
        sg.SparseGradLinear(lin, torch.eye(12), torch.eye(8), k=3, support="fixed", kind="x",
                            fixed_indices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="outside"):
        sg.SparseGradLinear(lin, torch.eye(12), torch.eye(8), k=2, support="fixed", kind="x",
                            fixed_indices=torch.tensor([1, 96]))


def test_deepcopy_and_state_dict_round_trip_keep_behaviour():
    _, layer, _, _ = make_pair(support="dynamic")
    opt = sg.SparseGradAdamW([layer.weight], lr=0.1, sparse_layers=[layer])
    for _ in range(3):
        layer(torch.randn(5, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert layer.delta_indices.numel() >= layer.k
    x = torch.randn(4, 8)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    _, fresh, _, _ = make_pair(support="dynamic")
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert torch.equal(fresh.delta_indices, layer.delta_indices)


def test_training_state_bytes_count_the_position_map_and_the_plans():
    # A dynamic layer after one step holds a dense int16 position map (2 bytes per weight entry), append-only
    # buffers of capacity 4k (indices int32, values and three fp32 state arrays: 20 bytes an entry) of which k are
    # in use (counted as params / optimizer state), and the journal of the step's increment (k int32 + k fp32).
    _, layer, _, _ = make_pair(out_f=40, in_f=30, bias=False, k=12)
    opt = sg.create_optimizer(nn.Sequential(layer), lr=1e-3)
    layer(torch.randn(5, 30)).sum().backward()
    opt.step()
    counted = sg.training_state_bytes(nn.Sequential(layer), opt)
    assert counted["bookkeeping"] == 2 * 40 * 30 + 3 * 12 * 20 + 12 * 8
    assert counted["total"] == sum(v for key, v in counted.items() if key != "total")
    # A fixed support: its plan (touched rows and columns, patterns) is counted once a backward has made it.
    _, fixed, _, _ = make_pair(out_f=40, in_f=30, bias=False, support="fixed", k=12)
    fixed.delta_indices = torch.arange(0, 1200, 100, dtype=torch.int32)  # rows 0, 3, 6, ..., columns 0, 10, 20
    assert sg.training_state_bytes(nn.Sequential(fixed))["bookkeeping"] == 0
    fixed(torch.randn(5, 30)).sum().backward()
    plan = fixed._plan
    assert (plan.urows.numel(), plan.ucols.numel()) == (12, 3)
    assert sg.training_state_bytes(nn.Sequential(fixed))["bookkeeping"] == plan.nbytes() > 12 * 4
