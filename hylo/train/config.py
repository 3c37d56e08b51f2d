"""`TrainConfig`: everything a training run needs, loaded from YAML (or a dict) and validated up front.

YAML layout (every key optional except ``data``; unknown keys are errors that name the key)::

    model:                       # a preset name plus overrides, or HyloConfig fields
      preset: tiny-all
      hidden_size: 128           # overrides the preset
      vocab_size: auto           # auto (default): the data's tokenizer vocab size
    data: runs/data/gutenberg    # a folder prepared by `hylo data prepare` (train + val splits)
    seq_len: 512
    batch_size: 8                # per rank, per micro-step: global batch = batch_size x world x grad_accum
    grad_accum: 1
    max_tokens: 50_000_000       # run length: max_tokens or max_steps (max_steps wins when both are set)
    optimizer: {lr: 3.0e-3, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}
    schedule: {kind: cosine, warmup: 0.02, min_lr_ratio: 0.1, decay_fraction: 0.2}   # cosine | wsd | constant
    eval_interval: 200           # steps; 0 = only at the end
    eval_batches: 20
    checkpoint_interval: 500     # steps; 0 = only at the end
    keep_checkpoints: 2
    out_dir: runs/tiny
    seed: 0
    bf16: true                   # autocast to bfloat16 on CUDA (ignored on CPU)
    compile: false               # torch.compile the model: true, or a mode (max-autotune-no-cudagraphs, ...)
    fsdp: false                  # FSDP2 (fully_shard) instead of DDP under torchrun
    fsdp_param_dtype: auto       # FSDP2's parameter gathers: auto (bfloat16 with bf16 on CUDA), float32, bfloat16
    logging: {log_interval: 10, tensorboard: false, wandb: false, wandb_project: hylo, run_name: null}
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A training setting is missing or invalid; the message names the key."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices (dim >= 2) only; forced to 0 when model.weight_norm is on
    grad_clip: float = 1.0  # 0 = no clipping (the grad norm is still measured)


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup: float | int = 0.0  # an int >= 1: steps; a float < 1: fraction of the run
    min_lr_ratio: float = 0.1  # final lr / peak lr (cosine floor, WSD end point)
    decay_fraction: float = 0.2  # WSD: the last fraction of the run that decays linearly


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between JSONL/TensorBoard/W&B records (the first and last step always logged)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "hylo"
    run_name: str | None = None


@dataclass
class TrainConfig:
    data: str | None = None
    model: dict = field(default_factory=lambda: {"preset": "tiny-all"})
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_tokens: int | None = None
    max_steps: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval_interval: int = 0
    eval_batches: int = 20
    eval_batch_size: int | None = None  # per rank; None = batch_size
    checkpoint_interval: int = 0
    keep_checkpoints: int = 2
    out_dir: str | None = None
    seed: int = 0
    bf16: bool = True
    compile: bool | str = False
    fsdp: bool = False
    fsdp_param_dtype: str = "auto"  # auto | float32 | bfloat16 (see hylo.train.dist)
    device: str = "auto"  # auto | cpu | cuda
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise TrainConfigError(f"a training config must be a mapping, got {type(d).__name__}")
        d = copy.deepcopy(d)
        sections = {"optimizer": OptimizerConfig, "schedule": ScheduleConfig, "logging": LoggingConfig}
        kwargs = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names:
                raise TrainConfigError(f"unknown training config key '{k}' (known: {', '.join(sorted(names))})")
            if k in sections:
                kwargs[k] = _section(sections[k], k, v)
            else:
                kwargs[k] = _coerce(cls, k, v)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        import yaml

        p = Path(path).expanduser()
        if not p.is_file():
            raise TrainConfigError(f"{p}: no such config file")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{p}: invalid YAML ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        return d

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with top-level keys replaced; dict values for sections/model are merged into them."""
        d = self.to_dict()
        for k, v in overrides.items():
            if k in ("optimizer", "schedule", "logging", "model") and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return TrainConfig.from_dict(d)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def pos_int(name, v, zero=False):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
                raise TrainConfigError(f"'{name}' must be an integer >= {0 if zero else 1}, got {v!r}")

        for k in ("seq_len", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints"):
            pos_int(k, getattr(self, k))
        for k in ("eval_interval", "checkpoint_interval", "seed"):
            pos_int(k, getattr(self, k), zero=True)
        for k in ("max_tokens", "max_steps", "eval_batch_size"):
            if getattr(self, k) is not None:
                pos_int(k, getattr(self, k))
        if not isinstance(self.model, (dict, str)):
            raise TrainConfigError(f"'model' must be a preset name or a mapping of HyloConfig fields, got {self.model!r}")
        if isinstance(self.model, str):
            self.model = {"preset": self.model}
        o = self.optimizer
        if not (isinstance(o.lr, (int, float)) and o.lr > 0 and math.isfinite(o.lr)):
            raise TrainConfigError(f"'optimizer.lr' must be a finite number > 0, got {o.lr!r}")
        if not (isinstance(o.betas, (list, tuple)) and len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)):
            raise TrainConfigError(f"'optimizer.betas' must be two numbers in [0, 1), got {o.betas!r}")
        o.betas = tuple(float(b) for b in o.betas)
        for k in ("eps", "weight_decay", "grad_clip"):
            v = getattr(o, k)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise TrainConfigError(f"'optimizer.{k}' must be a number >= 0, got {v!r}")
        s = self.schedule
        if s.kind not in ("cosine", "wsd", "constant"):
            raise TrainConfigError(f"'schedule.kind' must be cosine, wsd or constant, got {s.kind!r}")
        if isinstance(s.warmup, bool) or not isinstance(s.warmup, (int, float)) or s.warmup < 0:
            raise TrainConfigError(f"'schedule.warmup' must be steps (int) or a fraction (float < 1), got {s.warmup!r}")
        if isinstance(s.warmup, float) and s.warmup >= 1:
            raise TrainConfigError(f"'schedule.warmup' as a float is a fraction of the run and must be < 1; "
                                   f"write an integer for steps, got {s.warmup!r}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise TrainConfigError(f"'schedule.min_lr_ratio' must be in [0, 1], got {s.min_lr_ratio!r}")
        if not 0 < s.decay_fraction <= 1:
            raise TrainConfigError(f"'schedule.decay_fraction' must be in (0, 1], got {s.decay_fraction!r}")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if not isinstance(self.compile, bool) and self.compile not in modes:
            raise TrainConfigError(f"'compile' must be true, false or a torch.compile mode ({', '.join(modes)}), "
                                   f"got {self.compile!r}")
        if self.fsdp_param_dtype not in ("auto", "float32", "bfloat16"):
            raise TrainConfigError(f"'fsdp_param_dtype' must be auto, float32 or bfloat16, got {self.fsdp_param_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"'device' must be auto, cpu or cuda, got {self.device!r}")
        pos_int("logging.log_interval", self.logging.log_interval)

    # ------------------------------------------------------------------ derived
    def model_config(self, tokenizer_vocab: int | None = None):
        """The :class:`HyloConfig` to build: preset + overrides; ``vocab_size: auto`` takes ``tokenizer_vocab``."""
        from ..config import HyloConfig
        from ..presets import PRESETS

        m = dict(self.model)
        name = m.pop("preset", None)
        base = {}
        if name is not None:
            if name not in PRESETS:
                raise TrainConfigError(f"'model.preset' {name!r} is unknown; known: {', '.join(sorted(PRESETS))}")
            base = dict(PRESETS[name])
        vocab = m.pop("vocab_size", "auto")
        fields = {**base, **m}
        if vocab in ("auto", None):
            if tokenizer_vocab is None:
                vocab = base.get("vocab_size", 32000)
            else:
                vocab = tokenizer_vocab
        elif tokenizer_vocab is not None and isinstance(vocab, int) and vocab < tokenizer_vocab:
            raise TrainConfigError(f"'model.vocab_size' = {vocab} is smaller than the data's tokenizer vocabulary "
                                   f"({tokenizer_vocab}); use vocab_size: auto")
        fields["vocab_size"] = vocab
        fields.pop("model_type", None)
        return HyloConfig(**fields)

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.max_tokens is None:
            raise TrainConfigError("set the run length: 'max_tokens' or 'max_steps'")
        return max(1, self.max_tokens // self.tokens_per_step(world_size))

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size * self.seq_len

    def warmup_steps(self, total: int) -> int:
        w = self.schedule.warmup
        return int(w) if isinstance(w, int) else int(round(w * total))


def _section(cls, name: str, v: Any):
    if v is None:
        return cls()
    if not isinstance(v, dict):
        raise TrainConfigError(f"'{name}' must be a mapping, got {v!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in v:
        if k not in names:
            raise TrainConfigError(f"unknown key '{name}.{k}' (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(cls, k, x) for k, x in v.items()})


def _coerce(cls, key: str, v: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: turn numeric strings into the field's number type."""
    if not isinstance(v, str):
        return v
    kind = next(f.type for f in dataclasses.fields(cls) if f.name == key)
    try:
        if "int" in kind and v.strip().lstrip("-").replace("_", "").isdigit():
            return int(v)
        if kind.startswith("float"):
            return float(v)
        if kind.startswith("int") and float(v).is_integer():
            return int(float(v))
    except ValueError:
        pass
    return v


def load_config(config) -> TrainConfig:
    """A :class:`TrainConfig` from a TrainConfig, a dict, a YAML path, or a :class:`HyloConfig` (model only)."""
    from ..config import HyloConfig

    if isinstance(config, TrainConfig):
        return copy.deepcopy(config)
    if isinstance(config, HyloConfig):
        import inspect

        names = [p for p in inspect.signature(HyloConfig.__init__).parameters if p not in ("self", "kwargs")]
        model = {k: getattr(config, k) for k in names + ["tie_word_embeddings"] if hasattr(config, k)}
        return TrainConfig.from_dict({"model": model})
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.from_yaml(config)
    raise TrainConfigError(f"cannot make a training config from {type(config).__name__}")
