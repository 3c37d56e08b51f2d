"""`hylo train CONFIG.yaml [--resume]`: register with ``app.command("train")(train_command)`` in hylo.cli.

The same command runs under torchrun (``torchrun --nproc_per_node 4 -m hylo.cli_train CONFIG.yaml``, or
``torchrun ... $(which hylo) train CONFIG.yaml``): each rank trains its slice of the batch, rank 0 prints and
writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console


def _parse_set(items: list[str]) -> dict:
    """``a.b=value`` pairs (values parsed as YAML) into a nested dict."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes KEY=VALUE (e.g. optimizer.lr=1e-3), got {item!r}")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def train_command(
    config: Path = typer.Argument(..., help="training config (YAML)", exists=True, dir_okay=False),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in out_dir"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="override the config's out_dir"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="override the run length in steps"),
    stop_at_step: Optional[int] = typer.Option(None, "--stop-at-step",
                                               help="end (with a checkpoint) after this step, keeping the schedule "
                                                    "of the full run; continue later with --resume"),
    set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set optimizer.lr=1e-3 "
                                                     "(repeatable; dotted keys reach into sections)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress bar"),
):
    """Train a hylo model from a YAML config (single process, or one rank per process under torchrun)."""
    import yaml

    from .train import NonFiniteLossError, TrainConfig, TrainConfigError, TrainError, train
    from .train.checkpoint import CheckpointError

    rank = int(os.environ.get("RANK", "0"))
    console = Console(stderr=False) if rank == 0 else None
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        for k, v in _parse_set(set_).items():
            raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
        cfg = TrainConfig.from_dict(raw)
        out = out_dir if out_dir is not None else cfg.out_dir
        if out is None:
            raise TrainConfigError("set 'out_dir' in the config (or pass --out-dir): checkpoints and metrics go there")
        res = train(cfg, out_dir=out, max_steps=max_steps, resume=resume, progress=progress,
                    stop_at_step=stop_at_step, console=console)
    except NonFiniteLossError as e:
        if console:
            console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2)
    except (TrainError, TrainConfigError, CheckpointError, ValueError, yaml.YAMLError) as e:
        if console:
            console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1)
    if console:
        console.print(f"done: {res.steps} steps, {res.tokens:,} tokens, train loss {res.train_loss:.4f}, "
                      f"val loss {res.val_loss:.4f} (ppl {res.val_ppl:.2f}), {res.tokens_per_s:,.0f} tok/s · "
                      f"checkpoint {res.checkpoint}")


train_app = typer.Typer(pretty_exceptions_show_locals=False)
train_app.command()(train_command)

if __name__ == "__main__":
    train_app()
