"""The sparse-delta math against plain dense autograd on the same weights."""

import pytest
import torch
import torch.nn.functional as F

from peft_cpl.tuner import functional as SF
from peft_cpl.tuner import packed as P
from peft_cpl.tuner.support import Support, expand_rows

FORMS = [P.BITMASK, P.BLOCKED, P.FLAT]


def weight_numel(shape):
    return shape[0] * shape[1]


def _support(numel, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(numel, generator=generator)[: max(1, int(density * numel))]).values


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("density", [0.2, 0.002])  # dense-GEMM and coordinate-wise support gradients
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_base", [True, False])
def test_sparse_delta_linear_matches_dense_autograd(transposed, with_base, density, form):
    torch.manual_seed(0)
    out_features, in_features = 48, 80
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    weight = torch.randn(shape) if with_base else None
    bias = torch.randn(out_features) if with_base else None
    indices = _support(out_features * in_features, density).to(torch.int32)
    assert (indices.numel() < SF.COORDINATEWISE_GRAD_BELOW * weight_numel(shape)) == (density < 0.003)
    values = torch.randn(indices.numel(), requires_grad=True)
    x = torch.randn(3, 5, in_features, requires_grad=True)

    packed = P.pack(Support.of_indices(indices, shape), form=form)
    assert packed.form == form
    out = SF.sparse_delta_linear(x, weight, bias, [packed], [values], transposed)
    out.square().sum().backward()

    dense = torch.zeros(shape) if weight is None else weight.clone()
    dense.requires_grad_(True)
    effective = dense.reshape(-1).index_put((indices.long(),), values.detach(), accumulate=True).reshape(shape)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ effective if transposed else F.linear(x_ref, effective)
    if bias is not None:
        ref = ref + bias
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[indices.long()], rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_dense_weight_alive():
    """Between forward and backward the graph holds x, the base weight (not a copy) and the values."""
    weight = torch.randn(64, 48)
    indices = _support(64 * 48, 0.1)
    values = torch.zeros(indices.numel(), requires_grad=True)
    x = torch.randn(4, 48)
    out = SF.sparse_delta_linear(x, weight, None, [P.pack(Support.of_indices(indices, weight.shape))], [values])
    saved = out.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= weight.numel()]
    assert len(big) == 1 and big[0].data_ptr() == weight.data_ptr()


def test_several_deltas_fold_into_one_effective_weight_each_with_its_gradient():
    torch.manual_seed(3)
    weight, x = torch.randn(32, 40), torch.randn(6, 40)
    first, second = _support(1280, 0.5, seed=1), _support(1280, 0.01, seed=2)
    supports = [P.pack(Support.of_indices(i, (32, 40))) for i in (first, second)]
    assert [s.form for s in supports] == [P.BITMASK, P.BLOCKED]
    values = [torch.randn(i.numel(), requires_grad=True) for i in (first, second)]
    out = SF.sparse_delta_linear(x, weight, None, supports, values)
    out.square().sum().backward()
    dense = weight.clone().requires_grad_(True)
    delta = torch.zeros(1280).index_add(0, first, values[0].detach()).index_add(0, second, values[1].detach())
    ref = F.linear(x, dense + delta.reshape(32, 40))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for indices, value in zip((first, second), values):
        torch.testing.assert_close(value.grad, dense.grad.reshape(-1)[indices])


@pytest.mark.parametrize("form", [*FORMS, None])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.05, 0.3, 0.6, 1.0])
def test_packed_forms_round_trip_and_take_little_memory(form, density):
    shape = (96, 700)  # 67,200 coordinates: more than one 2^16 block
    numel = shape[0] * shape[1]
    indices = _support(numel, density) if density else torch.zeros(0, dtype=torch.int64)
    packed = P.pack(Support.of_indices(indices, shape), form=form)
    assert torch.equal(P.positions(packed), indices) and P.size(packed) == indices.numel()
    assert torch.equal(P.to_support(packed).indices, indices)
    dense = torch.randn(shape)
    values = torch.randn(indices.numel())
    torch.testing.assert_close(P.take(dense, packed), dense.reshape(-1)[indices])
    expected = dense.reshape(-1).clone().index_add_(0, indices, values, alpha=-0.5).reshape(shape)
    torch.testing.assert_close(P.add_into(dense.clone(), packed, values, alpha=-0.5), expected)
    if form is None and indices.numel():  # the automatic choice: at most 0.25 B (>= 0.5) and ~2 B (sparse) a value
        per_value = packed.nbytes / indices.numel()
        assert per_value <= {0.004: 2.05, 0.05: 2.01, 0.3: 0.42, 0.6: 0.21, 1.0: 0.13}[density]


def test_whole_rows_are_kept_as_row_ids():
    rows = Support.of_rows(torch.tensor([0, 3, 9]), (10, 16))
    packed = P.pack(rows)
    assert packed.form == P.ROWS and packed.nbytes == 3 * 8
    assert torch.equal(P.positions(packed), rows.indices) and P.size(packed) == 48
    columns = Support.of_rows(torch.tensor([2, 5]), (16, 10), output_dim=1)
    assert torch.equal(P.positions(P.pack(columns)), columns.indices)


def test_row_delta_linear_matches_dense():
    torch.manual_seed(1)
    out_features, in_features = 16, 12
    rows = torch.tensor([1, 4, 5, 11])
    values = torch.randn(rows.numel() * in_features, requires_grad=True)
    x = torch.randn(2, 3, in_features)
    out = SF.row_delta_linear(x, rows, values, out_features)
    dense = torch.zeros(out_features, in_features)
    dense.reshape(-1)[expand_rows(rows, (out_features, in_features))] = values.detach()
    torch.testing.assert_close(out, F.linear(x, dense))
    out.sum().backward()
    expected = x.reshape(-1, in_features).sum(0).repeat(rows.numel())
    torch.testing.assert_close(values.grad, expected)


def test_sparse_delta_embedding_matches_dense():
    torch.manual_seed(2)
    shape = (50, 8)
    indices = _support(400, 0.3)
    values = torch.randn(indices.numel(), requires_grad=True)
    ids = torch.tensor([[3, 7, 3, 49], [0, 0, 12, 7]])
    out = SF.sparse_delta_embedding(ids, P.pack(Support.of_indices(indices, shape), form=P.FLAT), values)
    dense = torch.zeros(400).index_put((indices,), values.detach()).reshape(shape).requires_grad_(True)
    ref = F.embedding(ids, dense)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[indices])


@pytest.mark.parametrize("density", [0.01, 0.0625, 0.1, 0.249, 0.25, 0.6])
def test_the_default_form_is_blocked_below_a_quarter_and_a_bitmask_from_it(density):
    numel = 3 * 2**16 + 1000  # several 16-bit blocks, the last one partial
    indices = _support(numel, density)
    packed = P.pack(Support.of_indices(indices, (numel // 8, 8)))
    assert packed.form == (P.BITMASK if indices.numel() >= numel / 4 else P.BLOCKED)
    assert packed.nbytes == P.packed_bytes(indices.numel(), numel)[packed.form]
    assert torch.equal(P.positions(packed), indices)


def test_blocked_positions_agree_on_the_cpu_and_the_accelerator_path():
    """The CPU expands a blocked support with numpy; CUDA uses torch ops without a host sync. Same coordinates,
    including empty blocks and low halves >= 2^15 (kept as two bytes each)."""
    numel = 5 * 2**16
    indices = torch.cat([torch.tensor([0, 2**15, 2**16 - 1]), torch.tensor([3 * 2**16 + 7, 5 * 2**16 - 1])])
    indices = torch.cat([indices, _support(2**16, 0.3, seed=4) + 2**16]).unique()  # block 2 stays empty
    packed = P.pack(Support.of_indices(indices, (numel,)), form=P.BLOCKED)
    assert torch.equal(P._blocked_positions_numpy(packed), indices)
    assert torch.equal(P._blocked_positions_torch(packed, indices.numel()), indices)
