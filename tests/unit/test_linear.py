"""oneDNN-prepacked linear layers: same results as F.linear, tied weights survive."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferd.models.layers.linear import Embedding, Linear, MergedLinear, prepack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def _filled(layer: Linear) -> Linear:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 7, 64])
def test_packed_matches_plain(bias, rows):
    layer = _filled(MergedLinear(48, [32, 16, 16], bias))
    w, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, 48)
    assert prepack_linears(layer) == 1
    assert layer.weight is None  # the plain copy is freed
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert [t.shape[-1] for t in layer.split(got)] == [32, 16, 16]


def test_tied_weight_is_kept_for_the_embedding():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embedding(100, 24)
            self.head = Linear(24, 100)
            self.head.weight = self.embed.weight

    m = Tied()
    with torch.no_grad():
        m.embed.weight.normal_()
    table = m.embed.weight.detach().clone()
    assert prepack_linears(m) == 1
    assert m.head.weight is m.embed.weight  # still shared, still plain
    ids = torch.tensor([3, 99])
    with torch.inference_mode():
        torch.testing.assert_close(m.embed(ids), table[ids])
        torch.testing.assert_close(m.head(table[ids]), table[ids] @ table.T, atol=1e-4, rtol=1e-5)


def test_num_parameters_counts_packed_weights():
    from inferd.models.layers.linear import num_parameters
    layer = _filled(Linear(48, 32, bias=True))
    before = num_parameters(layer)
    assert before == 48 * 32 + 32
    prepack_linears(layer)
    assert num_parameters(layer) == before


def test_float_logits_into_a_reused_buffer():
    from inferd.models.layers.linear import to_float_logits
    y = torch.randn(3, 50).bfloat16()
    buf = torch.full((8, 50), float("nan"))
    got = to_float_logits(y, buf[:3])
    assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.float32
    assert torch.equal(got, y.float()) and buf[3:].isnan().all()
    assert torch.equal(to_float_logits(y, None), y.float())
    f32 = torch.randn(3, 50)
    assert to_float_logits(f32, buf[:3]) is f32  # float32 heads need no copy at all
