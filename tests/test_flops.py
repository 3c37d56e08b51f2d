"""FLOP counts used for MFU: brute-force checks of the formulas."""

import torch

from hylo.flops import _attention, model_flops, peak_bf16_tflops, weight_flops
from hylo.presets import preset
from hylo.model import HybridLM


def test_attention_counts_visible_keys():
    T, w, H, d = 37, 8, 3, 16
    full = sum(t + 1 for t in range(T)) / T
    window = sum(min(t + 1, w) for t in range(T)) / T
    assert abs(_attention(H, d, T) - 4 * full * H * d) < 1e-9
    assert abs(_attention(H, d, T, window=w) - 4 * window * H * d) < 1e-9
    assert _attention(H, d, T, window=T + 5) == _attention(H, d, T)


def test_weight_flops_are_two_per_linear_weight():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny-all"))
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert weight_flops(model) == 2 * linear_weights
    f = model_flops(model, seq_len=64)
    assert set(f["by_operator"]) == {"attn", "swa", "mamba2", "deltanet", "gdn", "jet", "ffn", "lm_head"}
    assert f["train"] == 3 * f["forward"]
    # mixing adds to the weights of every token mixer, and attention's share grows with the sequence
    layers_only = weight_flops(model.layers)
    assert f["forward"] - f["by_operator"]["lm_head"] > layers_only
    g = model_flops(model, seq_len=128)
    assert g["by_operator"]["attn"] > f["by_operator"]["attn"]
    assert g["by_operator"]["ffn"] == f["by_operator"]["ffn"]


def test_peak_lookup():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("Some GPU") is None
