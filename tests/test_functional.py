"""The sparse-delta math against plain dense autograd on the same weights."""

import pytest
import torch
import torch.nn.functional as F

from peft_cpl.tuner import functional as SF
from peft_cpl.tuner.support import expand_rows


def weight_numel(shape):
    return shape[0] * shape[1]


def _support(numel, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(numel, generator=generator)[: max(1, int(density * numel))]).values


@pytest.mark.parametrize("density", [0.2, 0.002])  # dense-GEMM and coordinate-wise support gradients
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_base", [True, False])
def test_sparse_delta_linear_matches_dense_autograd(transposed, with_base, density):
    torch.manual_seed(0)
    out_features, in_features = 48, 80
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    weight = torch.randn(shape) if with_base else None
    bias = torch.randn(out_features) if with_base else None
    indices = _support(out_features * in_features, density).to(torch.int32)
    assert (indices.numel() < SF.COORDINATEWISE_GRAD_BELOW * weight_numel(shape)) == (density < 0.003)
    values = torch.randn(indices.numel(), requires_grad=True)
    x = torch.randn(3, 5, in_features, requires_grad=True)

    out = SF.sparse_delta_linear(x, weight, bias, indices, values, shape, transposed)
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
    """Between forward and backward the graph holds x, the base weight (not a copy), the indices and the values."""
    weight = torch.randn(64, 48)
    indices = _support(64 * 48, 0.1)
    values = torch.zeros(indices.numel(), requires_grad=True)
    x = torch.randn(4, 48)
    out = SF.sparse_delta_linear(x, weight, None, indices, values, weight.shape)
    saved = out.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= weight.numel()]
    assert len(big) == 1 and big[0].data_ptr() == weight.data_ptr()


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
    out = SF.sparse_delta_embedding(ids, indices, values, shape)
    dense = torch.zeros(400).index_put((indices,), values.detach()).reshape(shape).requires_grad_(True)
    ref = F.embedding(ids, dense)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[indices])
