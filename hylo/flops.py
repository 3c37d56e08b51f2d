"""Training FLOPs per token, counted per operator, for throughput and MFU reports.

The count is what the fast path computes, not ``6 x parameters``:

- every matrix product with a weight (all ``nn.Linear`` layers and the LM head; the embedding lookup is free):
  ``2 x in x out`` per token forward;
- softmax attention at sequence length ``T``: ``QK^T`` and ``PV`` over the visible keys, causal, so on average
  ``T/2`` keys (a flash kernel skips the masked blocks): ``2 x 2 x (T/2) x heads x head_dim``; sliding-window
  attention sees ``min(window, t)`` keys at position ``t``;
- chunked linear operators (fla's kernels, chunk ``C = 64``), per token and head with key/value dims ``dk, dv``:
  the full ``C x C`` intra-chunk products ``2C(dk + dv)``, the state read and state update ``4 dk dv``; the delta
  rule adds its WY representation (``k k^T``, ``w``, ``u``: ``2C(2 dk + dv)``) and the ``w S`` correction
  (``2 dk dv``). Mamba2's SSD is the gated linear attention form (``dk`` = state size, ``dv`` = head dim);
- short convolutions: ``2 x kernel x channels``.

Elementwise work (norms, activations, gates) is not counted, as is usual. Backward = 2 x forward, so a training
step costs ``3 x forward``. Attention's term and the chunked terms are documented so that a reader can compare with
the ``6N + 12 L H Q T`` convention (which counts attention non-causally: twice ours).
"""

from __future__ import annotations

from torch import nn

FLA_CHUNK = 64


def _attention(heads: int, head_dim: int, seq_len: int, window: int | None = None) -> float:
    if window is None or window >= seq_len:
        keys = (seq_len + 1) / 2
    else:  # positions < window see t+1 keys, the rest see `window`
        keys = ((window * (window + 1) / 2) + (seq_len - window) * window) / seq_len
    return 4.0 * keys * heads * head_dim


def _linear_chunked(heads: int, dk: int, dv: int, delta: bool, chunk: int = FLA_CHUNK) -> float:
    f = 2 * chunk * (dk + dv) + 4 * dk * dv
    if delta:
        f += 2 * chunk * (2 * dk + dv) + 2 * dk * dv
    return float(heads * f)


def mixer_flops(config, op: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's token mixing (weights excluded: see :func:`weight_flops`)."""
    c = config
    if op == "attn":
        return _attention(c.attn_num_heads, c.attn_head_dim, seq_len)
    if op == "swa":
        return _attention(c.attn_num_heads, c.attn_head_dim, seq_len, c.swa_window)
    if op == "mamba2":
        heads = c.mamba2_expand * c.hidden_size // c.mamba2_head_dim
        conv = 2 * c.mamba2_conv_size * (heads * c.mamba2_head_dim + 2 * c.mamba2_n_groups * c.mamba2_state_size)
        return _linear_chunked(heads, c.mamba2_state_size, c.mamba2_head_dim, delta=False) + conv
    if op == "deltanet":
        h, d = c.deltanet_num_heads, c.deltanet_head_dim
        return _linear_chunked(h, d, d, delta=True) + 2 * c.deltanet_conv_size * 3 * h * d
    if op == "gdn":
        h, dk, dv = c.gdn_num_heads, c.gdn_head_k_dim, c.gdn_head_v_dim
        return _linear_chunked(h, dk, dv, delta=True) + 2 * c.gdn_conv_size * h * (2 * dk + dv)
    if op == "jet":
        h, dk, dv = c.jet_num_heads, c.jet_head_k_dim, c.jet_head_v_dim
        return _linear_chunked(h, dk, dv, delta=True) + 2 * c.jet_conv_size * h * dv
    if op == "ffn":
        return 0.0
    raise ValueError(f"unknown operator {op!r}")


def weight_flops(module: nn.Module) -> float:
    """Forward FLOPs per token of the weight matrix products inside ``module`` (``2 x in x out`` per Linear)."""
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def model_flops(model, seq_len: int) -> dict:
    """Per-token FLOPs of a :class:`hylo.HybridLM`: ``{"forward", "train", "by_operator": {op: forward}}``.

    ``by_operator`` splits the forward count by layer operator (weights + mixing), plus ``lm_head``.
    """
    cfg = model.config
    by_op: dict[str, float] = {}
    for block in model.layers:
        f = weight_flops(block) + mixer_flops(cfg, block.op, seq_len)
        by_op[block.op] = by_op.get(block.op, 0.0) + f
    by_op["lm_head"] = 2.0 * cfg.hidden_size * cfg.vocab_size
    fwd = sum(by_op.values())
    return {"forward": fwd, "train": 3 * fwd, "by_operator": by_op}


# Dense bf16 tensor-core peaks from the vendor's datasheets (no sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The datasheet bf16 dense peak for a CUDA device name, or None if unknown."""
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return v
    return None
