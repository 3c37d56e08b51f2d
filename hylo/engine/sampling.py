"""Next-token choice on the device, without host syncs: greedy, temperature, top-k and top-p (nucleus).

Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)`` from a ``torch.Generator``: the same distribution as
``torch.multinomial(p, 1)`` (the exponential-race form of the Gumbel-max trick), but a fixed sequence of plain
kernels with no synchronisation, and reproducible for a seeded generator.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """float32 logits ``[B, V]`` with the tokens outside the top-k and outside the top-p nucleus set to -inf.

    ``top_k=0`` and ``top_p=1`` disable the filters. The nucleus keeps the smallest set of most likely tokens
    whose probability reaches ``top_p`` (at least one token).
    """
    x = logits.float()
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_x = sorted_x.masked_fill(before >= top_p, float("-inf"))  # the top token always has before = 0
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return x


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``logits [B, V]``: ``LongTensor[B]`` on the logits' device.

    ``temperature == 0`` is greedy (argmax; top-k/top-p do not change it). Otherwise the logits are divided by
    the temperature, filtered by :func:`filter_logits` and sampled with ``generator``.
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    x = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = x.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)
