"""Training: YAML configs, the loop (single process, DDP or FSDP2 under torchrun), checkpoints, and the
in-process :func:`train` API used by the architecture search."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from .config import LoggingConfig, OptimizerConfig, ScheduleConfig, TrainConfig, TrainConfigError, load_config
from .schedule import Schedule
from .trainer import NonFiniteLossError, Result, Trainer, TrainError, train

__all__ = ["CheckpointError", "LoggingConfig", "NonFiniteLossError", "OptimizerConfig", "Result", "Schedule",
           "ScheduleConfig", "TrainConfig", "TrainConfigError", "TrainError", "Trainer", "latest_checkpoint",
           "load_checkpoint", "load_config", "load_model", "save_checkpoint", "train"]
