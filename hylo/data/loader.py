"""`TokenLoader`: (inputs, targets) batches from the memory-mapped shards written by :func:`hylo.data.prepare`.

A split is read as one token stream (its shards concatenated), cut into windows of ``seq_len + 1`` tokens
with stride ``seq_len``. ``random`` mode visits the windows of each epoch in a seeded permutation, shifted by a
seeded offset in ``[0, seq_len)`` so later epochs see other cut points, and never ends. ``sequential`` mode
walks the windows in order once (for evaluation). Each step takes ``batch_size * world_size`` windows and
rank ``r`` gets the ``r``-th slice, so ranks are disjoint. The position is just (epoch, step): everything else is
recomputed from the seed, so a resumed loader yields exactly the batches an uninterrupted one would.
``pin_memory=True`` (the trainer's choice on CUDA) returns batches in page-locked memory, so the trainer's
``.to(device, non_blocking=True)`` is a real asynchronous copy: from pageable memory the host waits for it, and
so for the GPU's queued work, before it can launch the next step's kernels.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .prepare import DTYPES, DataError


_pin = torch.Tensor.pin_memory  # a module attribute, so a CPU-only test can stand in for it


def read_manifest(path_or_manifest: str | os.PathLike) -> tuple[Path, dict]:
    """(dataset folder, manifest) from a folder holding ``manifest.json`` or the manifest file itself."""
    path = Path(path_or_manifest).expanduser()
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{path}: no manifest.json (prepare the data with `hylo data prepare` first)")
    return file.parent, json.loads(file.read_text())


class TokenLoader:
    """Deterministic, resumable, rank-sharded batches of ``(inputs, targets)`` LongTensors ``[batch, seq_len]``."""

    def __init__(self, path_or_manifest: str | os.PathLike, split: str = "train", seq_len: int = 1024,
                 batch_size: int = 8, seed: int = 0, mode: str = "random", rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        if mode not in ("random", "sequential"):
            raise DataError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        root, self.manifest = read_manifest(path_or_manifest)
        if split not in self.manifest["splits"]:
            raise DataError(f"{root}: no split '{split}' (have {', '.join(self.manifest['splits'])})")
        self.split, self.seq_len, self.batch_size, self.seed, self.mode = split, seq_len, batch_size, seed, mode
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        dtype = DTYPES[self.manifest["dtype"]]
        self._shards = []
        for shard in self.manifest["splits"][split]["shards"]:
            file = root / shard["file"]
            expected = shard["tokens"] * np.dtype(dtype).itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"{file}: missing or not {expected} bytes as the manifest says")
            self._shards.append(np.memmap(file, dtype=dtype, mode="r"))
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.num_tokens = self._offsets[-1]
        # random mode keeps one window of slack so every offset in [0, seq_len) fits
        self.num_windows = (self.num_tokens - 1) // seq_len if mode == "sequential" else self.num_tokens // seq_len - 1
        self.steps_per_epoch = max(self.num_windows, 0) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"split '{split}' has {self.num_tokens} tokens: too few for one step of "
                            f"{batch_size} x {world_size} windows of {seq_len + 1} tokens")
        self.epoch, self.step = 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.steps_per_epoch

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(token offset, window order) of an epoch."""
        if self.mode == "sequential":
            return 0, np.arange(self.num_windows)
        rng = np.random.default_rng([self.seed, epoch])
        return int(rng.integers(self.seq_len)), rng.permutation(self.num_windows)

    def _read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the split's stream from ``start``, across shard boundaries if needed."""
        i = bisect.bisect_right(self._offsets, start) - 1
        pieces = []
        while length > 0:
            piece = self._shards[i][start - self._offsets[i]: start - self._offsets[i] + length]
            pieces.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from the current position; the loader itself holds the position (no read-ahead)."""
        per_step = self.batch_size * self.world_size
        while True:
            offset, order = self._plan(self.epoch)
            while self.step < self.steps_per_epoch:
                lo = self.step * per_step + self.rank * self.batch_size
                rows = [self._read(offset + int(w) * self.seq_len, self.seq_len + 1)
                        for w in order[lo: lo + self.batch_size]]
                batch = torch.from_numpy(np.stack(rows).astype(np.int64))
                if self.pin_memory:
                    batch = _pin(batch)
                self.step += 1  # advance before yielding: state_dict() then points at the next batch
                yield batch[:, :-1], batch[:, 1:]
            self.epoch, self.step = self.epoch + 1, 0
            if self.mode == "sequential":
                return  # one pass; iterating again starts the next pass

    def state_dict(self) -> dict:
        """Position plus the settings it is only valid for."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "mode": self.mode, "split": self.split,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; refuses a state from a loader with other settings or data."""
        for key in ("seed", "mode", "split", "seq_len", "batch_size", "world_size", "num_tokens"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has {getattr(self, key)!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
