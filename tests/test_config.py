"""Config parsing, serialization and every validation error."""

import json

import pytest

from hylo import HyloConfig, HyloConfigError, parse_pattern


def test_short_and_long_pattern_agree():
    long = ["deltanet", "ffn", "mamba2", "ffn", "attn", "ffn", "swa", "gdn", "jet"]
    assert parse_pattern("d f m2 f a f swa gdn jet") == long
    assert parse_pattern(long) == long
    assert HyloConfig(layers="d,f,m2").layers == ["deltanet", "ffn", "mamba2"]


def test_json_round_trip(tmp_path):
    cfg = HyloConfig(vocab_size=100, hidden_size=64, layers="a f m2 f", attn_num_heads=4, attn_num_kv_heads=2,
                     num_meta_tokens=3, weight_norm=True, swa_window=7)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "hylo" and data["layers"] == ["attn", "ffn", "mamba2", "ffn"]
    back = HyloConfig.from_pretrained(tmp_path)
    for k in ("layers", "num_meta_tokens", "weight_norm", "attn_num_kv_heads", "attn_head_dim", "swa_window"):
        assert getattr(back, k) == getattr(cfg, k)


def test_derived_sizes():
    cfg = HyloConfig(hidden_size=96, attn_num_heads=6, layers="a gdn jet d f")
    assert cfg.attn_head_dim == 16 and cfg.ffn_intermediate_size == 288
    assert cfg.gdn_head_k_dim == 16 and cfg.gdn_head_v_dim == 32 and cfg.deltanet_head_dim == 16


@pytest.mark.parametrize("kwargs, field, fragment", [
    (dict(layers="a f xyz"), "layers[2]", "operator names"),
    (dict(layers="f f"), "layers", "token mixer"),
    (dict(layers=""), "layers", "at least one layer"),
    (dict(layers=42), "layers", "list of operator names"),
    (dict(hidden_size=100, attn_num_heads=7), "attn_num_heads", "must divide hidden_size"),
    (dict(attn_num_heads=8, attn_num_kv_heads=3), "attn_num_kv_heads", "must divide attn_num_heads"),
    (dict(hidden_size=0), "hidden_size", "integer >= 1"),
    (dict(vocab_size=-5), "vocab_size", "integer >= 1"),
    (dict(layers="swa f", swa_window=0), "swa_window", "integer >= 1"),
    (dict(layers="swa f", swa_window=-3), "swa_window", "integer >= 1"),
    (dict(num_meta_tokens=-1), "num_meta_tokens", "integer >= 0"),
    (dict(layers="m2 f", mamba2_head_dim=48), "mamba2_head_dim", "must divide"),
    (dict(layers="m2 f", mamba2_state_size=0), "mamba2_state_size", "integer >= 1"),
    (dict(layers="m2 f", mamba2_n_groups=3), "mamba2_n_groups", "must divide"),
    (dict(layers="d f", hidden_size=100, deltanet_num_heads=3, attn_num_heads=4), "deltanet_num_heads", "divide"),
    (dict(layers="gdn", gdn_head_v_dim=0), "gdn_head_v_dim", "integer >= 1"),
    (dict(layers="jet", jet_kernel_reduction=7), "jet_kernel_reduction", "must divide"),
    (dict(layers="jet", jet_conv_size=0), "jet_conv_size", "integer >= 1"),
    (dict(norm_eps=0), "norm_eps", "> 0"),
    (dict(attn_head_dim=15), "attn_head_dim", "even"),
    (dict(rope_theta=-1.0), "rope_theta", "> 0"),
    (dict(ffn_intermediate_size=0), "ffn_intermediate_size", "integer >= 1"),
])
def test_bad_config_names_field(kwargs, field, fragment):
    with pytest.raises(HyloConfigError) as e:
        HyloConfig(**kwargs)
    assert e.value.field == field
    assert fragment in str(e.value) and field in str(e.value)


def test_error_raised_before_any_tensor(monkeypatch):
    import torch

    def boom(*a, **k):
        raise AssertionError("a tensor was built")

    monkeypatch.setattr(torch, "empty", boom)
    with pytest.raises(HyloConfigError):
        HyloConfig(layers="a f q")
