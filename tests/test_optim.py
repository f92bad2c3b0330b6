"""The optimizer: the dynamic top-k lazy Adam against a dense re-implementation, and torch.optim conventions."""

import copy
import math

import pytest
import torch
from torch import nn

import sparsegrad as sg
from test_layer import make_pair


def reference_dynamic_training(ref: nn.Linear, u_out, u_in, k, batches, lr, betas, eps, wd):
    """Dense bookkeeping: full-size rotated delta, moments and per-entry step counts; autograd on plain Linear."""
    w0 = ref.weight.detach().clone()
    out_f, in_f = w0.shape
    delta = torch.zeros(out_f, in_f)
    m, v, t = torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros_like(delta)
    for x in batches:
        lin = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w0 + u_out @ delta @ u_in.T)
        lin(x).square().sum().backward()
        r = u_out.T @ lin.weight.grad @ u_in
        sel = torch.zeros(out_f * in_f, dtype=torch.bool)
        sel[torch.topk(r.abs().flatten(), k).indices] = True
        sel = sel.view(out_f, in_f)
        t[sel] += 1
        m[sel] = betas[0] * m[sel] + (1 - betas[0]) * r[sel]
        v[sel] = betas[1] * v[sel] + (1 - betas[1]) * r[sel] ** 2
        mhat = m[sel] / (1 - betas[0] ** t[sel])
        vhat = v[sel] / (1 - betas[1] ** t[sel])
        delta[sel] = delta[sel] * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)
    return w0 + u_out @ delta @ u_in.T, delta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_dynamic_step_matches_dense_reference(wd):
    ref, layer, u_out, u_in = make_pair(out_f=12, in_f=8, bias=False, k=9)
    batches = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    opt = sg.SparseGradAdamW([layer.weight], lr=0.05, weight_decay=wd, sparse_layers=[layer])
    for i, x in enumerate(batches):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        if i == 0:
            assert layer.delta_indices.numel() == 9  # exactly k entries on the first step
    expected_w, expected_delta = reference_dynamic_training(ref, u_out, u_in, 9, batches, 0.05, (0.9, 0.999), 1e-8, wd)
    torch.testing.assert_close(layer.weight.detach(), expected_w, rtol=1e-4, atol=1e-5)
    dense = torch.zeros(96)
    dense[layer.delta_indices] = layer.delta_values
    torch.testing.assert_close(dense.view(12, 8), expected_delta, rtol=1e-4, atol=1e-5)
    assert layer.entries_updated() == int((expected_delta != 0).sum())
    # the optimizer state is aligned with the support, never dense
    state = opt.state[layer.weight]
    assert state["exp_avg"].numel() == layer.delta_indices.numel() < 96


def test_fixed_support_trains_k_values_with_k_sized_state():
    _, layer, _, _ = make_pair(support="fixed", k=7)
    model = nn.Sequential(layer)
    opt = sg.create_optimizer(model, lr=0.01)
    for _ in range(3):
        model(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[layer.delta_values]
    assert state["exp_avg"].shape == (7,) and state["exp_avg_sq"].shape == (7,)
    assert layer.entries_updated() == 7
    assert not torch.equal(layer.weight, layer.base_weight)


def test_state_dict_round_trip_continues_identically():
    def train(steps, layer, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            layer(torch.randn(5, 8, generator=g)).square().sum().backward()
            opt.step()
            opt.zero_grad()

    _, a, _, _ = make_pair()
    opt_a = sg.SparseGradAdamW([a.weight, a.bias], lr=0.05, sparse_layers=[a])
    train(3, a, opt_a, 0)
    _, b, _, _ = make_pair()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    opt_b = sg.SparseGradAdamW([b.weight, b.bias], lr=0.05, sparse_layers=[b])
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(3, a, opt_a, 1)
    train(3, b, opt_b, 1)
    torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)


def test_validation_errors_like_torch_optim():
    _, layer, _, _ = make_pair()
    model = nn.Sequential(layer)
    for kwargs, msg in [({"lr": -1.0}, "learning rate"), ({"eps": -1.0}, "epsilon"),
                        ({"betas": (1.5, 0.9)}, "beta"), ({"weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(ValueError, match=msg):
            sg.create_optimizer(model, **kwargs)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sg.create_optimizer(frozen)


def test_groups_keep_norms_and_biases_and_work_with_schedulers(tiny_bert):
    from conftest import bert_batches

    cfg = sg.SparseGradConfig(density=0.05)
    bases = sg.estimate_bases(tiny_bert, cfg, bert_batches(2), progress=False)
    sg.get_sparsegrad_model(tiny_bert, cfg, bases, keep_requires_grad=True)  # norms train too: their group
    opt = sg.create_optimizer(tiny_bert, lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.Optimizer)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in tiny_bert.named_parameters() if id(p) in in_opt}
    assert any("LayerNorm" in n for n in names) and any(n.endswith("bias") for n in names)
    assert {n for n, p in tiny_bert.named_parameters() if p.requires_grad} == names
    no_decay = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    for batch in bert_batches(3, seed=2):
        tiny_bert(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert math.isclose(opt.param_groups[0]["lr"], 1e-3 * 0.7)


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_gradient_accumulation_equals_the_larger_batch(support):
    """Two half-batches summed before the step choose the same top-k and give the same update as one batch."""
    _, a, _, _ = make_pair(support=support, k=9)
    _, b, _, _ = make_pair(support=support, k=9)
    if support == "fixed":
        for layer in (a, b):
            layer.delta_indices = torch.arange(0, 90, 10, dtype=layer.index_dtype)
    opt_a = sg.create_optimizer(nn.Sequential(a), lr=0.05)
    opt_b = sg.create_optimizer(nn.Sequential(b), lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 8, generator=g)
        a(x).square().mean().backward()
        for half in (x[:4], x[4:]):
            (b(half).square().mean() / 2).backward()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert torch.equal(a.delta_indices, b.delta_indices)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)


def _train_mode_run(steps, layer, opt, seed=0):
    layer.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        layer(torch.randn(16, 32, generator=g)).square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("identity", [False, True])
def test_incremental_weight_stays_within_rounding_and_exact_rebuilds_catch_up(identity):
    _, layer, _, _ = make_pair(out_f=48, in_f=32, k=30, identity=identity, bias=False)
    opt = sg.SparseGradAdamW([layer.weight], lr=0.01, sparse_layers=[layer])
    steps = sg.optim.EXACT_REBUILD_EVERY - 1
    _train_mode_run(steps, layer, opt)
    assert layer._weight_inexact  # the steps updated the weight incrementally
    incremental = layer.weight.detach().clone()
    exact = layer._plus_delta(layer.base_weight, layer.delta_indices, layer.delta_values, *layer._rotation())
    assert (incremental - exact).abs().max() < 1e-6 * exact.abs().max()
    _train_mode_run(1, layer, opt, seed=1)  # the EXACT_REBUILD_EVERY-th step rebuilds exactly
    assert not layer._weight_inexact
    exact = layer._plus_delta(layer.base_weight, layer.delta_indices, layer.delta_values, *layer._rotation())
    assert torch.equal(layer.weight.detach(), exact)
    layer.eval()  # an eval-mode forward after an incremental step sees the exact weight (what an adapter reloads)
    _train_mode_run(1, layer, opt, seed=2)
    layer.eval()
    layer(torch.randn(2, 32))
    exact = layer._plus_delta(layer.base_weight, layer.delta_indices, layer.delta_values, *layer._rotation())
    assert torch.equal(layer.weight.detach(), exact)


def test_optimizer_state_dict_replays_the_increments_bit_for_bit():
    """A resume restores the model's delta (its weight rebuilt exactly), then the optimizer: the weight is then
    the incrementally updated one of the run that saved, so the two runs continue identically."""
    _, a, _, _ = make_pair(out_f=48, in_f=32, k=30)
    opt_a = sg.SparseGradAdamW([a.weight], lr=0.01, sparse_layers=[a])
    _train_mode_run(5, a, opt_a)
    saved = copy.deepcopy(opt_a.state_dict())  # does not touch the running weight
    assert a._weight_inexact and "increment_indices" in saved["state"][0]
    assert bool((a.delta_indices[1:] > a.delta_indices[:-1]).all())  # sorted when read
    _, b, _, _ = make_pair(out_f=48, in_f=32, k=30)
    b.delta_indices, b.delta_values = a.delta_indices.clone(), a.delta_values.clone()
    b.sync_weight(force=True)
    opt_b = sg.SparseGradAdamW([b.weight], lr=0.01, sparse_layers=[b])
    opt_b.load_state_dict(saved)
    assert torch.equal(b.weight, a.weight)
    _train_mode_run(4, a, opt_a, seed=3)
    _train_mode_run(4, b, opt_b, seed=3)
    assert torch.equal(b.weight, a.weight) and torch.equal(b.delta_values, a.delta_values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_is_refused_before_any_layer_changes(bad):
    _, a, _, _ = make_pair()
    _, b, _, _ = make_pair(seed=1)
    opt = sg.SparseGradAdamW([a.weight, b.weight], lr=0.05, sparse_layers=[a, b])
    x = torch.randn(5, 8)
    (a(x).sum() + b(x).sum()).backward()
    b.weight.grad[3, 2] = bad
    before = a.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite gradient in SparseGrad layer of kind 'k'"):
        opt.step()
    assert torch.equal(a.weight, before) and a.delta_indices.numel() == 0


def test_a_tie_at_the_cut_keeps_the_lower_indices():
    _, layer, _, _ = make_pair(identity=True, k=3, bias=False)
    opt = sg.SparseGradAdamW([layer.weight], lr=0.05, sparse_layers=[layer])
    layer.weight.grad = torch.zeros(12, 8)
    layer.weight.grad.view(-1)[[5, 9, 40, 70]] = torch.tensor([2.0, 1.0, -1.0, 1.0])  # 3 tie at |1|, 2 go in
    opt.step()
    assert layer.delta_indices.tolist() == [5, 9, 40]


def test_one_host_sync_per_step_and_a_bounded_op_count():
    """A dynamic step reads the host once for all layers, and layers of one kind (one shape, shared bases) step
    together: at most issue 13's 30 aten ops per matrix (the real MiniLM count: benchmarks/op_count.py)."""
    from torch.profiler import profile

    layers = [layer for _, layer in _shared_basis_layers((48, 32), 4, 30, False, seed=0)[0]]
    opt = sg.SparseGradAdamW([m.weight for m in layers], lr=0.01, sparse_layers=layers)

    def backward(seed):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
        sum(m(x).square().sum() for m in layers).backward()

    for s in range(3):
        backward(s)
        opt.step()
        opt.zero_grad()
    backward(9)
    with profile() as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    syncs = sum(n in ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "sparsegrad::host_read")
                for n in names)
    top = [e for e in prof.events() if e.name.startswith("aten::") and not any(
        p.name.startswith("aten::") for p in _ancestors(e))]
    assert syncs <= 2
    assert len(top) / len(layers) <= 30


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _shared_basis_layers(shape, count, k, identity, seed):
    """``count`` dynamic layers of one shape sharing one pair of bases (as the blocks of a kind do), and the plain
    nn.Linear each was converted from."""
    from test_layer import orthogonal

    out_f, in_f = shape
    u_out = torch.eye(out_f) if identity else orthogonal(out_f, seed + 1)
    u_in = torch.eye(in_f) if identity else orthogonal(in_f, seed + 2)
    pairs = []
    for j in range(count):
        torch.manual_seed(seed + 10 * j)
        ref = nn.Linear(in_f, out_f, bias=False)
        pairs.append((ref, sg.SparseGradLinear(copy.deepcopy(ref), u_out, u_in, k=k, support="dynamic", kind="k",
                                               identity_basis=identity).train()))
    return pairs, u_out, u_in


def _batches(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, shape[1], generator=g) for _ in range(steps)]


def _train_stacked(layers, opt, data):
    for step in range(len(data[0])):
        sum(layer(x[step]).square().sum() for layer, x in zip(layers, data)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("identity", [False, True])
def test_stacked_layers_each_match_the_dense_reference(identity):
    """Layers of one shape step together (one top-k, gather, scatter and sparse product for all): each layer still
    follows the dense reference (autograd on its unrotated nn.Linear, plain Adam on the chosen entries), for both
    orientations of the sparse-first product (out < in and out > in)."""
    wide, u_out_w, u_in_w = _shared_basis_layers((8, 12), 3, 9, identity, seed=0)
    tall, u_out_t, u_in_t = _shared_basis_layers((12, 8), 2, 9, identity, seed=5)
    pairs = wide + tall
    layers = [layer for _, layer in pairs]
    data = [_batches((layer.out_features, layer.in_features), 6, seed=j) for j, layer in enumerate(layers)]
    opt = sg.SparseGradAdamW([m.weight for m in layers], lr=0.05, weight_decay=0.1, sparse_layers=layers)
    _train_stacked(layers, opt, data)
    assert sorted(len(stack.layers) for stack in opt._stacks.values()) == [2, 3]  # really stacked
    for (ref, layer), x in zip(pairs, data):
        u_out, u_in = (u_out_w, u_in_w) if layer.out_features == 8 else (u_out_t, u_in_t)
        expected_w, expected_delta = reference_dynamic_training(ref, u_out, u_in, 9, x, 0.05, (0.9, 0.999), 1e-8, 0.1)
        torch.testing.assert_close(layer.weight.detach(), expected_w, rtol=1e-4, atol=1e-5)
        dense = torch.zeros(96)
        dense[layer.delta_indices] = layer.delta_values
        torch.testing.assert_close(dense.view(expected_delta.shape), expected_delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("identity", [False, True])
def test_a_stacked_step_is_bit_identical_to_stepping_each_layer_alone(identity):
    def run(together):  # two kinds of one shape (as LLaMA's gate and up): one stack, one product per kind
        pairs = _shared_basis_layers((12, 8), 2, 9, identity, seed=2)[0] + \
            _shared_basis_layers((12, 8), 2, 9, identity, seed=3)[0]
        layers = [layer for _, layer in pairs]
        data = [_batches((12, 8), 5, seed=j) for j in range(4)]
        if together:
            _train_stacked(layers, sg.SparseGradAdamW([m.weight for m in layers], lr=0.05, sparse_layers=layers), data)
        else:
            for layer, x in zip(layers, data):
                _train_stacked([layer], sg.SparseGradAdamW([layer.weight], lr=0.05, sparse_layers=[layer]), [x])
        return layers

    for a, b in zip(run(True), run(False)):
        assert a._weight_inexact and torch.equal(a.weight, b.weight)
        assert torch.equal(a.delta_indices, b.delta_indices) and torch.equal(a.delta_values, b.delta_values)


def test_stacked_resume_replays_the_increments_bit_for_bit():
    pairs, _, _ = _shared_basis_layers((12, 8), 3, 9, False, seed=4)
    layers = [layer for _, layer in pairs]
    opt = sg.SparseGradAdamW([m.weight for m in layers], lr=0.05, sparse_layers=layers)
    data = [_batches((12, 8), 9, seed=j) for j in range(3)]
    _train_stacked(layers, opt, [x[:5] for x in data])
    saved_model = [copy.deepcopy(m.state_dict()) for m in layers]
    saved_opt = copy.deepcopy(opt.state_dict())
    fresh, _, _ = _shared_basis_layers((12, 8), 3, 9, False, seed=4)
    resumed = [layer for _, layer in fresh]
    for layer, state in zip(resumed, saved_model):
        layer.load_state_dict(state)
    opt_b = sg.SparseGradAdamW([m.weight for m in resumed], lr=0.05, sparse_layers=resumed)
    opt_b.load_state_dict(saved_opt)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(layers, resumed))
    _train_stacked(layers, opt, [x[5:] for x in data])
    _train_stacked(resumed, opt_b, [x[5:] for x in data])
    for a, b in zip(layers, resumed):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.delta_values, b.delta_values)


def test_a_stack_staggers_its_exact_rebuilds():
    """Layer l of a stack rebuilds exactly at its step EXACT_REBUILD_EVERY - l (then every EXACT_REBUILD_EVERY), so
    no step rebuilds them all; the rebuilt weight is the exact W0 + delta."""
    layers = [layer for _, layer in _shared_basis_layers((12, 8), 3, 9, False, seed=6)[0]]
    opt = sg.SparseGradAdamW([m.weight for m in layers], lr=0.05, sparse_layers=layers)
    data = [_batches((12, 8), sg.optim.EXACT_REBUILD_EVERY, seed=j) for j in range(3)]
    rebuilt = {j: [] for j in range(3)}
    for step in range(sg.optim.EXACT_REBUILD_EVERY):
        _train_stacked(layers, opt, [x[step:step + 1] for x in data])
        for j, layer in enumerate(layers):
            if not layer._weight_inexact:
                rebuilt[j].append(step + 1)
                exact = layer._plus_delta(layer.base_weight, layer.delta_indices, layer.delta_values,
                                          *layer._rotation())
                assert torch.equal(layer.weight.detach(), exact)
    assert rebuilt == {j: [sg.optim.EXACT_REBUILD_EVERY - j] for j in range(3)}


@pytest.mark.parametrize("stacked", [True, False])
def test_two_pass_top_k_picks_the_sorted_set_with_its_cut_and_maximum(stacked):
    """`topk_rows` (top blocks by their maxima, then their entries), on stacked rows (the rotated gradients) and
    on a list of matrices (MeProp's unstacked gradients), against an independent sort: the same set where no tie
    straddles the cut, its signed scores, the same tie flag and the same largest magnitude, NaN and inf and -inf
    included; small rows take the one-pass path, the rest the two-pass one."""
    from sparsegrad.layer import topk_rows

    g = torch.Generator().manual_seed(3)
    for trial in range(80):
        n = 8 * int(torch.randint(2 if trial < 10 else 8, 120, (1,), generator=g))
        k = int(torch.randint(1, max(2, n // 16), (1,), generator=g)) if trial >= 5 else n + trial - 3
        rows = torch.randint(-4, 5, (3, n), generator=g).float() if trial % 2 else torch.randn(3, n, generator=g)
        if trial % 5 == 0:
            rows[1, int(torch.randint(0, n, (1,), generator=g))] = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        given = rows if stacked else [row.view(8, -1) for row in rows]
        idx, picked, tie, top = topk_rows(given, k)
        for r in range(3):
            mags = [(math.inf if math.isnan(v) else abs(v)) for v in rows[r].tolist()]
            order = sorted(range(n), key=lambda j: (-mags[j], j))
            if k < n:
                assert bool(tie[r]) == (mags[order[k - 1]] == mags[order[k]])
            expected_top = rows[r].abs().max() if not rows[r].isnan().any() else torch.tensor(float("nan"))
            torch.testing.assert_close(top[r], expected_top, equal_nan=True)
            torch.testing.assert_close(picked[r], rows[r][idx[r]], equal_nan=True)
            if not tie[r]:
                assert sorted(idx[r].tolist()) == sorted(order[:min(k, n)])


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_sparse_first_products_match_float64_in_either_basis_layout(shape):
    """The exact rebuild and the stacked increment (embedding_bag over the transposed basis) against float64 dense
    products, with column-major bases (as layers store them) and row-major ones."""
    from sparsegrad.layer import add_increments, column_major, increment_order_key, rotated_to_weight

    o, i = shape
    torch.manual_seed(0)
    u_out, u_in = torch.linalg.qr(torch.randn(o, o))[0], torch.linalg.qr(torch.randn(i, i))[0]
    idx = torch.randperm(o * i)[:5].sort().values.int()
    vals = torch.randn(5)
    dense = torch.zeros(o * i, dtype=torch.float64)
    dense[idx.long()] = vals.double()
    expected = u_out.double() @ dense.view(o, i) @ u_in.double().T
    for a, b in ((column_major(u_out), column_major(u_in)), (u_out.contiguous(), u_in.contiguous())):
        torch.testing.assert_close(rotated_to_weight(idx, vals, a, b, shape).double(), expected, rtol=0, atol=1e-6)
        stacked = torch.stack([idx, torch.randperm(o * i)[:5].int()])
        stacked = stacked.gather(1, increment_order_key(stacked, shape).sort(dim=1).indices)
        changes = torch.randn(2, 5)
        weights = [torch.zeros(o, i), torch.zeros(o, i)]
        add_increments(weights, stacked, changes, [a, a], [b, b], shape)
        for w, ix, ch in zip(weights, stacked, changes):
            d = torch.zeros(o * i, dtype=torch.float64)
            d[ix.long()] = ch.double()
            torch.testing.assert_close(w.double(), u_out.double() @ d.view(o, i) @ u_in.double().T, rtol=0, atol=1e-6)
    _, layer, _, _ = make_pair()
    assert layer.u_out.mT.is_contiguous() and layer.u_in.mT.is_contiguous()  # the sparse products' fast layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_rebuild_is_w0_plus_the_dense_delta_bit_for_bit(dtype):
    """MeProp's exact rebuild (entry by entry, no dense delta, an unsorted support) against W0 plus the dense
    scattered delta in fp32, rounded to the weight's dtype: the same bits, W0's -0.0 entries included."""
    _, layer, _, _ = make_pair(identity=True, dtype=dtype)
    base = layer.base_weight.clone()
    base.view(-1)[:6] = -0.0
    indices = torch.tensor([50, 3, 77, 1], dtype=torch.int32)  # unsorted, as the optimizer appends them
    values = torch.randn(4)
    dense = torch.zeros(base.numel())
    dense[indices.long()] = values
    expected = (base.float() + dense.view(base.shape)).to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(layer._plus_delta(base, indices, values, None, None).view(bits), expected.view(bits))
