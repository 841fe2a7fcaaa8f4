"""16-bit weights multiplied in float32 on CPUs without 16-bit matrix units."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mechbiqa.model.load import load_pretrained, save_pretrained
from mechbiqa.model.precision import FEW_ROWS, half_matmuls_are_slow, linear, upcast_matmuls
from mechbiqa.sources import tiny_random_model


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    size = model.cfg.vision.image_size
    ids = torch.randint(3, model.cfg.llm.vocab_size, (2, 9), generator=g)
    ids[:, 2] = -200
    return ids, torch.randn(2, 3, size, size, generator=g)


def test_upcast_linear_layers_compute_each_product_in_float32_and_keep_16_bit_weights(tmp_path):
    model, _, _ = tiny_random_model(0)
    save_pretrained(model, tmp_path / "ck")
    half = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    upcast_matmuls(half, False)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    n = upcast_matmuls(half)
    linears = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    assert n == len(linears) > 10
    attention = [m for m in half.modules() if hasattr(m, "float32_products") and not isinstance(m, torch.nn.Linear)]
    assert len(attention) == len(half.vision.blocks) + len(half.abstractor.blocks) + len(half.llm.blocks)
    assert all(m.float32_products for m in attention)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # memory: the weights stay 16-bit
    assert half.state_dict().keys() == before.keys()
    assert all(torch.equal(half.state_dict()[k], before[k]) for k in before)
    layer = linears[0]
    x = torch.randn(FEW_ROWS + 1, layer.in_features).to(torch.bfloat16)
    bias = None if layer.bias is None else layer.bias.float()
    expected = F.linear(x.float(), layer.weight.float(), bias).to(torch.bfloat16)  # by hand
    assert layer(x).dtype == torch.bfloat16 and torch.equal(layer(x), expected)
    few = x[:FEW_ROWS]  # a decoding step's few rows: in 16 bits, as the layer would without the switch
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))
    ids, pixels = _inputs(half)
    with torch.no_grad():
        upcast = half(ids, images=pixels.to(torch.bfloat16)).logits.float()
        upcast_matmuls(half, False)
        native = half(ids, images=pixels.to(torch.bfloat16)).logits.float()
        full = model(ids, images=pixels).logits
    assert not any("forward" in m.__dict__ for m in linears)  # switched back
    upcast_matmuls(half)
    _, cache = half.run_with_cache(ids, images=pixels.to(torch.bfloat16))
    _, reference = model.run_with_cache(ids, images=pixels)
    assert set(cache) == set(reference)  # every hook still fires, the unembedding's included
    assert torch.equal(cache["llm.unembed.hook_out"], half(ids, images=pixels.to(torch.bfloat16)).logits)
    upcast_matmuls(half, False)
    assert not any(m.float32_products for m in attention)
    # the same model in 16 bits either way: both near float32, and near each other
    scale = full.abs().max()
    assert (upcast - full).abs().max() < 0.05 * scale and (native - full).abs().max() < 0.05 * scale
    assert (upcast - native).abs().max() < 0.05 * scale


def test_load_pretrained_upcasts_only_16_bit_models_on_a_cpu_without_16_bit_units(tmp_path):
    model, _, _ = tiny_random_model(0)
    save_pretrained(model, tmp_path / "ck")
    switched = lambda m: any("forward" in x.__dict__ for x in m.modules())  # noqa: E731
    assert not switched(load_pretrained(tmp_path / "ck"))  # float32: nothing to do
    assert switched(load_pretrained(tmp_path / "ck", dtype=torch.float16)) == half_matmuls_are_slow("cpu")
    assert not half_matmuls_are_slow("meta") and not half_matmuls_are_slow("cuda")


def test_float32_products_under_autograd_keep_only_16_bit_tensors_and_give_the_float32_gradients():
    torch.manual_seed(0)
    weight = torch.randn(48, 40).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(48).to(torch.bfloat16).requires_grad_()
    x = torch.randn(2, FEW_ROWS, 40).to(torch.bfloat16).requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linear(x, weight, bias, float32=True)
    assert saved and all(dtype == torch.bfloat16 for dtype, _ in saved)  # no float32 copy of the weight waits
    upstream = torch.randn(out.shape)
    out.backward(upstream.to(out.dtype))
    # by hand, in float32: d/dx = g W, d/dW = g^T x, d/db = sum g
    g = upstream.to(torch.bfloat16).float().reshape(-1, 48)
    flat = x.detach().float().reshape(-1, 40)
    assert torch.equal(x.grad, (g @ weight.detach().float()).to(torch.bfloat16).reshape(x.shape))
    assert torch.equal(weight.grad, (g.T @ flat).to(torch.bfloat16))
    assert torch.equal(bias.grad, g.sum(0).to(torch.bfloat16))
    expected = F.linear(x.detach().float(), weight.detach().float(), bias.detach().float()).to(torch.bfloat16)
    assert torch.equal(out.detach(), expected)
