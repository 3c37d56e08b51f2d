"""`HybridCache`: the decode state of every layer of a hybrid, KV and recurrent states together.

``states[i]`` is layer i's state dict (see ``hylo.layers.base``). ``seq_len`` counts the positions
consumed so far, meta tokens included; ``pos`` is the same as a ``LongTensor[B]`` used by
``decode_step`` (a static tensor, updated in place, so a captured CUDA graph sees the new value).

For transformers' ``generate`` the cache is duck-typed rather than a subclass of ``transformers.Cache``: that
class is a list of per-layer key/value stores with an ``update(k, v)`` API that recurrent states do not fit, and
``generate`` (5.0 to 5.23) only reads ``get_seq_length``, ``is_compileable`` and, for beam search,
``reorder_cache``.
"""

from __future__ import annotations

import torch


class HybridCache:
    is_compileable = False  # generate must not auto-compile the forward or build 4D masks for this cache

    def __init__(self, states: list[dict], batch_size: int, max_len: int, num_meta_tokens: int = 0,
                 growable: bool = False):
        self.states = states
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_meta_tokens = num_meta_tokens
        self.growable = growable
        self.seq_len = 0
        device = next((t.device for st in states for t in st.values()), torch.device("cpu"))
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)

    def advance(self, n: int) -> None:
        self.seq_len += n
        self.pos.add_(n)

    def ensure_capacity(self, length: int, model) -> None:
        """Grow (double) the length-dependent states when ``length`` positions would not fit."""
        if length <= self.max_len:
            return
        if not self.growable:
            raise ValueError(f"the cache holds {self.max_len} positions (meta tokens included); {length} needed. "
                             "Allocate it with a larger max_len.")
        new_len = max(length, 2 * self.max_len)
        p = next(model.parameters())
        for i, block in enumerate(model.layers):
            old = self.states[i]
            probe = block.mixer.init_state(self.batch_size, new_len, device="meta", dtype=p.dtype)
            if all(probe[k].shape == old[k].shape for k in old):
                continue  # fixed-size state (recurrent, conv, full ring buffer): nothing to grow
            new = block.mixer.init_state(self.batch_size, new_len, device=p.device, dtype=p.dtype)
            block.mixer.copy_state(old, new, self.seq_len)
            self.states[i] = new
        self.max_len = new_len

    # --- the few calls transformers' generate makes on a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len - self.num_meta_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len - self.num_meta_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for st in self.states:
            for k, t in st.items():
                st[k] = t.index_select(0, beam_idx.to(t.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.states for t in st.values())
