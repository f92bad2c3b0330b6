"""The dynamic step's position map in int16 (2 bytes per weight entry), promoted to int32 when a support outgrows it:
lookups against a plain dict, training against the dense reference and bit for bit against an int32-only map."""

import pytest
import torch

import sparsegrad as sg
from sparsegrad import position_map
from sparsegrad.position_map import NARROW_CAPACITY, PositionMap
from test_layer import make_pair
from test_optim import reference_dynamic_training

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_against(pm: PositionMap, where: dict[tuple[int, int], int], rows: int, numel: int) -> None:
    idx = torch.arange(numel).expand(rows, numel)
    expected = torch.full((rows, numel), -1, dtype=torch.int32)
    for (r, e), p in where.items():
        expected[r, e] = p
    assert torch.equal(pm.lookup(idx), expected)


def test_narrow_map_holds_every_position_up_to_its_capacity_and_promotes_in_place():
    rows, numel = 2, 70000
    pm = PositionMap(rows, numel, 0, torch.device("cpu"))
    assert pm.table.dtype == torch.int16 and pm.nbytes() == 2 * rows * numel
    g = torch.Generator().manual_seed(0)
    entries = [torch.randperm(numel, generator=g) for _ in range(rows)]
    # fill row 0 to the last int16 position (65,534) and row 1 with a few, in three appends
    where = {}
    for start, stop in ((0, 10), (10, 40000), (40000, NARROW_CAPACITY)):
        pm.reserve(stop)
        assert pm.table.dtype == torch.int16
        for r, count in ((0, stop), (1, min(stop, 40))):
            if start < count:
                idx = entries[r][start:count][None]
                pm.write(idx, torch.arange(start, count, dtype=torch.int32)[None], row=r)
                where.update({(r, int(e)): p for p, e in enumerate(entries[r][:count].tolist())})
    _check_against(pm, where, rows, numel)
    pm.reserve(NARROW_CAPACITY + 1)  # one entry more than int16 can place: promoted, nothing lost
    assert pm.table.dtype == torch.int32 and pm.nbytes() == 4 * rows * numel
    _check_against(pm, where, rows, numel)
    both = torch.stack([entries[0][NARROW_CAPACITY:NARROW_CAPACITY + 5], entries[1][40:45]])
    pm.write(both, torch.tensor([[65535 + j for j in range(5)], [40 + j for j in range(5)]], dtype=torch.int32))
    where.update({(0, int(e)): 65535 + j for j, e in enumerate(both[0].tolist())})
    where.update({(1, int(e)): 40 + j for j, e in enumerate(both[1].tolist())})
    _check_against(pm, where, rows, numel)


def _train(steps: int, out_f: int, in_f: int, k: int, seed: int = 0):
    ref, layer, u_out, u_in = make_pair(out_f=out_f, in_f=in_f, bias=False, k=k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(6, in_f, generator=g) for _ in range(steps)]
    opt = sg.SparseGradAdamW([layer.weight], lr=0.05, weight_decay=0.1, sparse_layers=[layer])
    dtypes = []
    for x in batches:
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        dtypes.append(next(iter(opt._stacks.values())).pos_map.table.dtype)
    return ref, layer, u_out, u_in, batches, opt, dtypes


def _assert_matches_reference(ref, layer, u_out, u_in, batches, k):
    expected_w, expected_delta = reference_dynamic_training(ref, u_out, u_in, k, batches, 0.05, (0.9, 0.999), 1e-8, 0.1)
    torch.testing.assert_close(layer.weight.detach(), expected_w, rtol=1e-4, atol=1e-5)
    dense = torch.zeros(expected_delta.numel())
    dense[layer.delta_indices.long()] = layer.delta_values
    torch.testing.assert_close(dense.view(expected_delta.shape), expected_delta, rtol=1e-4, atol=1e-5)


def test_a_support_growing_past_int16_promotes_the_map_and_follows_the_dense_reference():
    # 256 x 384 = 98,304 entries, k = 24,000: the union passes 65,535 entries within a few steps
    k = 24000
    ref, layer, u_out, u_in, batches, _, dtypes = _train(5, 256, 384, k)
    assert layer.delta_indices.numel() > NARROW_CAPACITY
    assert dtypes[0] == torch.int16 and dtypes[-1] == torch.int32
    _assert_matches_reference(ref, layer, u_out, u_in, batches, k)


def test_the_narrow_map_and_its_promotion_change_no_bit(monkeypatch):
    # the same run with the int16 map (promoted past 20 entries here) and with an int32 map from the start
    monkeypatch.setattr(position_map, "NARROW_CAPACITY", 20)
    narrow = _train(6, 12, 8, 9)
    assert narrow[-1][0] == torch.int16 and narrow[-1][-1] == torch.int32
    _assert_matches_reference(*narrow[:5], 9)
    monkeypatch.setattr(position_map, "NARROW_CAPACITY", -1)
    wide = _train(6, 12, 8, 9)
    assert set(wide[-1]) == {torch.int32}
    for a, b in ((narrow[1].weight, wide[1].weight), (narrow[1].delta_indices, wide[1].delta_indices),
                 (narrow[1].delta_values, wide[1].delta_values)):
        assert torch.equal(a, b)
    sa, sb = narrow[5].state_dict()["state"][0], wide[5].state_dict()["state"][0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)
