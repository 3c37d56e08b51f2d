"""The training loop behind ``hylo train`` and :func:`hylo.train.train`.

One step = ``grad_accum`` micro-batches of ``batch_size`` sequences per rank -> clip -> AdamW -> lr schedule ->
(weight-norm projection when ``model.weight_norm``). Every ``eval_interval`` steps and at the end the
validation loss is measured on the first ``eval_batches`` batches of the ``val`` split (always the same
batches). A non-finite loss or gradient norm stops the run with :class:`NonFiniteLossError` before the
update is applied; the checkpoints already written are left as they are.

With a fused AdamW on plain tensors (CUDA, DDP included; not FSDP2) that check costs no GPU->host sync per step:
the step's "non-finite" flag goes to the optimizer as ``found_inf`` (GradScaler's hook: the fused kernel skips
the update and the step count on the device), the loss and gradient norm are copied to the host asynchronously,
and step N's values are checked once step N+1's forward/backward is queued, before its ``optimizer.step()``;
they are checked at once before anything is logged, evaluated or saved. Elsewhere each step reads them at once.

Resuming (``resume=True`` / ``--resume``) restores model, optimizer, scheduler, every rank's RNG states and
the loader position from the latest checkpoint and truncates ``metrics.jsonl`` to that step, so the
resumed run reproduces an uninterrupted one step for step (bit-exact on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist as D
from .checkpoint import (latest_checkpoint, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig, TrainConfigError, load_config
from .schedule import Schedule, make_scheduler


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN/inf; ``step`` is the step that failed, ``checkpoint`` the last good one."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class Result:
    """What a run produced. ``history``: one dict per logged step; ``evals``: one per evaluation."""

    val_loss: float
    val_ppl: float
    train_loss: float
    steps: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    num_params: int
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out_dir: str | None = None
    checkpoint: str | None = None
    stopped_early: bool = False
    model: Any = None  # the trained HybridLM when return_model=True


# ---------------------------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _finite(x: float) -> bool:
    return math.isfinite(x)


class _StepValues:
    """One step's loss and gradient norm on their way to the host: the copy is queued at once (pinned buffer and
    an event on CUDA) and :meth:`get` waits for that copy alone, not for the work queued after it."""

    def __init__(self, step: int, lr: float, loss: torch.Tensor, gn: torch.Tensor):
        self.step, self.lr = step, lr
        vals = torch.stack([loss.detach().double(), gn.detach().double()])  # float64: exact for any float input
        self.event = None
        if vals.is_cuda:
            self.host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
            self.host.copy_(vals, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = vals

    def get(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()
        loss, gn = self.host.tolist()
        return loss, gn


class _Metrics:
    """metrics.jsonl (rank 0, when there is an out_dir) plus optional TensorBoard / W&B, plus in-memory lists."""

    def __init__(self, cfg: TrainConfig, out: Path | None, enabled: bool, resume_step: int | None, run_id: str):
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.file = None
        self.tb = None
        self.wandb = None
        if not (enabled and out):
            return
        path = out / "metrics.jsonl"
        if resume_step is not None and path.is_file():  # drop what was logged after the checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)
            for ln in kept:
                rec = json.loads(ln)
                (self.evals if rec.get("kind") == "eval" else self.history).append(rec)
        self.file = open(path, "a", buffering=1)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainError(f"logging.tensorboard is on but TensorBoard is not installed ({e}); "
                                 "pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                raise TrainError("logging.wandb is on but wandb is not installed; pip install wandb") from None
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name or out.name,
                                    id=run_id, resume="allow", dir=str(out), config=cfg.to_dict())

    def log(self, rec: dict) -> None:
        (self.evals if rec.get("kind") == "eval" else self.history).append(rec)
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in rec.items() if k not in ("kind", "step") and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])
        if self.wandb:
            self.wandb.log({f"{rec.get('kind', 'train')}/{k}": v for k, v in scalars.items()}, step=rec["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_curves(history: list[dict], evals: list[dict], path: Path) -> bool:
    """PNG of train (and val) loss against tokens; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in history], [r["loss"] for r in history], label="train", lw=1)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    _defer_checks = True  # False: read every step's loss and gradient norm at once (tests compare both paths)

    def __init__(self, config, data: str | os.PathLike | None = None, max_tokens: int | None = None,
                 out_dir: str | os.PathLike | None = None, *, max_steps: int | None = None, resume: bool = False,
                 progress: bool = False, stop_at_step: int | None = None, return_model: bool = False,
                 console=None, **overrides):
        cfg = load_config(config)
        over = dict(overrides)
        if data is not None:
            over["data"] = str(data)
        if max_tokens is not None:
            over["max_tokens"], over["max_steps"] = max_tokens, None
        if max_steps is not None:
            over["max_steps"] = max_steps
        over["out_dir"] = str(out_dir) if out_dir is not None else None
        self.cfg = cfg.replace(**over) if over else cfg
        if self.cfg.data is None:
            raise TrainConfigError("no data: set 'data' to a folder prepared with `hylo data prepare`")
        self.resume, self.progress, self.stop_at_step = resume, progress, stop_at_step
        self.return_model = return_model
        self.console = console
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------------------- output
    def _say(self, msg: str) -> None:
        self.notes.append(msg)
        if self.info.is_main and self.console is not None:
            self.console.print(msg)

    # ---------------------------------------------------------------------------------------- state
    def _state(self, step: int, tokens: int) -> dict:
        if self.cfg.fsdp and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            msd, osd = get_state_dict(self.model, self.optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            msd, osd = self.raw.state_dict(), self.optimizer.state_dict()
        return {"format": "hylo-train/1", "step": step, "tokens": tokens, "model": msd, "optimizer": osd,
                "scheduler": self.scheduler.state_dict(), "loader": self.train_loader.state_dict(),
                "rng": D.all_gather_object(rng_state(), self.info), "world_size": self.info.world_size,
                "train_config": self.cfg.to_dict(), "model_config": self.raw.config.to_dict(),
                "run_id": self.run_id}

    def _save(self, step: int, tokens: int) -> None:
        bad = [n for n, p in self.raw.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never write a checkpoint that cannot be good
            raise NonFiniteLossError(f"non-finite weights after step {step} (e.g. {bad[0]}): not saving",
                                     step, self.last_ckpt)
        state = self._state(step, tokens)
        if self.info.is_main:
            self.last_ckpt = str(save_checkpoint(self.out / "checkpoints", step, state, self.cfg.keep_checkpoints))
        self.last_ckpt = D.broadcast_object(self.last_ckpt, self.info)
        D.barrier(self.info)

    def _export(self) -> None:
        """Write the finished model as a Hugging Face folder ``<out_dir>/model`` (config.json, safetensors and
        the data's tokenizer), the form that ``hylo generate``, ``hylo eval`` and ``from_pretrained`` open."""
        from ..loading import _tokenizer_from_manifest
        from ..model import HybridLM

        msd = self._state(self.step, self.tokens)["model"] if self.cfg.fsdp and self.info.distributed \
            else self.raw.state_dict()
        if self.info.is_main:
            target = self.out / "model"
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export = HybridLM(self.raw.config)
            export.load_state_dict({k: v.detach().to("cpu") for k, v in msd.items()})
            export.save_pretrained(str(tmp))
            tok_spec = _tokenizer_from_manifest(self.cfg.to_dict())
            if tok_spec is not None:
                from ..data.tokenizer import load_tokenizer

                load_tokenizer(tok_spec).save_pretrained(str(tmp))
            else:
                self._say("warning: the data's tokenizer was not found (manifest.json names none that exists "
                          "here); the exported model has none: pass --tokenizer to hylo generate / eval")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            self._say(f"model: {target}")
        D.barrier(self.info)

    def _restore(self, state: dict) -> None:
        if self.cfg.fsdp and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.raw.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])

    # ---------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        from ..data import TokenLoader
        from ..data.loader import read_manifest
        from ..model import HybridLM

        cfg, info = self.cfg, self.info
        _, manifest = read_manifest(cfg.data)
        tok_vocab = manifest.get("tokenizer", {}).get("vocab_size")
        model_cfg = cfg.model_config(tok_vocab)
        self.out = Path(cfg.out_dir).expanduser() if cfg.out_dir else None

        resume_state = None
        if self.out is not None:
            ckpt = latest_checkpoint(self.out / "checkpoints")
            if self.resume:
                if ckpt is None:
                    raise TrainError(f"--resume: no checkpoint in {self.out / 'checkpoints'} to resume from")
                resume_state = load_checkpoint(ckpt)
                self._say(f"resuming from {ckpt} (step {resume_state['step']}, {resume_state['tokens']:,} tokens)")
            elif ckpt is not None:
                raise TrainError(f"{self.out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue "
                                 "it or choose another out_dir")
        elif self.resume:
            raise TrainError("resume needs an out_dir holding checkpoints")
        if resume_state is not None:
            saved = dict(resume_state["model_config"])
            now = model_cfg.to_dict()
            diff = sorted(k for k in set(saved) | set(now)
                          if k not in ("transformers_version",) and saved.get(k) != now.get(k))
            if diff:
                raise TrainError(f"the checkpoint's model config differs from this config in: {', '.join(diff)}")
            if resume_state["world_size"] != info.world_size and cfg.batch_size * info.world_size != \
                    resume_state["train_config"]["batch_size"] * resume_state["world_size"]:
                raise TrainError(f"the checkpoint was written with world size {resume_state['world_size']}; "
                                 f"resume with the same world size (now {info.world_size})")
            for k in ("seq_len", "batch_size", "grad_accum", "seed"):
                if resume_state["train_config"][k] != getattr(cfg, k):
                    self._say(f"[yellow]note: {k} changed since the checkpoint "
                              f"({resume_state['train_config'][k]} -> {getattr(cfg, k)})[/]")
        self.run_id = resume_state["run_id"] if resume_state else f"{int(time.time())}-{os.getpid()}"

        _seed_all(cfg.seed)
        model = HybridLM(model_cfg).to(info.device)
        self.raw = model
        self.num_params = sum(p.numel() for p in model.parameters())
        if cfg.compile:
            model.compile(**({} if cfg.compile is True else {"mode": cfg.compile}))
        self._cudagraphs = cfg.compile in ("reduce-overhead", "max-autotune")
        self.model = D.wrap(model, info, cfg.fsdp, self.fsdp_param_dtype(cfg, info))

        wd = cfg.optimizer.weight_decay
        if model_cfg.weight_norm and wd:
            self._say(f"note: optimizer.weight_decay {wd} -> 0 because model.weight_norm is on "
                      "(matrices are projected onto the unit sphere after every step)")
            wd = 0.0
        fused = info.device.type == "cuda"  # also for FSDP2: DTensor shards the fused AdamW kernel too
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, wd), lr=cfg.optimizer.lr,
                                           betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                                           **({"fused": True} if fused else {}))
        self._params = [p for p in self.model.parameters()]
        # skip bad steps on the device and check them one step late (module docstring): needs the fused kernel's
        # found_inf; DTensor parameters (FSDP2) keep the synchronous check
        self._defer = self._defer_checks and all(g.get("fused") for g in self.optimizer.param_groups) and \
            not any(hasattr(p, "full_tensor") for p in self._params)
        self.total_steps = cfg.total_steps(info.world_size)
        self.scheduler = make_scheduler(self.optimizer, Schedule(
            cfg.schedule.kind, self.total_steps, cfg.warmup_steps(self.total_steps), cfg.schedule.min_lr_ratio,
            cfg.schedule.decay_fraction))
        self.train_loader = TokenLoader(cfg.data, "train", cfg.seq_len, cfg.batch_size, cfg.seed, "random",
                                        info.rank, info.world_size, pin_memory=info.device.type == "cuda")
        self.val_loader = None
        if "val" in manifest["splits"] and manifest["splits"]["val"].get("tokens", 1) > 0:
            try:
                self.val_loader = TokenLoader(cfg.data, "val", cfg.seq_len, cfg.eval_batch_size or cfg.batch_size,
                                              cfg.seed, "sequential", info.rank, info.world_size)
            except Exception as e:  # too small for one batch
                self._say(f"[yellow]note: no validation ({e})[/]")
        else:
            self._say("[yellow]note: the data has no val split: no validation loss[/]")

        self.step, self.tokens, self.last_ckpt = 0, 0, None
        if resume_state is not None:
            self._restore(resume_state)
            self.step, self.tokens = resume_state["step"], resume_state["tokens"]
            self.last_ckpt = str(ckpt)
        if self.out is not None and info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            model_cfg.to_json_file(str(self.out / "config.json"))
        self.metrics = _Metrics(cfg, self.out, info.is_main, self.step if resume_state else None, self.run_id)
        del resume_state

    @staticmethod
    def fsdp_param_dtype(cfg: TrainConfig, info: D.DistInfo) -> torch.dtype:
        """FSDP2's gather dtype: ``fsdp_param_dtype``, where ``auto`` is bfloat16 when the run autocasts to bf16
        (``bf16`` on CUDA: the matmuls read bf16 weights anyway) and float32 otherwise."""
        name = cfg.fsdp_param_dtype
        if name == "auto":
            name = "bfloat16" if cfg.bf16 and info.device.type == "cuda" else "float32"
        return getattr(torch, name)

    # ---------------------------------------------------------------------------------------- eval
    def _autocast(self):
        if self.info.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.val_loader is None:
            return float("nan")
        net = self.model if (self.cfg.fsdp and self.info.distributed) else self.raw
        was_training = net.training
        net.eval()
        self.val_loader.epoch, self.val_loader.step = 0, 0
        n = min(self.cfg.eval_batches, len(self.val_loader))
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for i, (x, y) in enumerate(self.val_loader):
            if i >= n:
                break
            x, y = x.to(self.info.device, non_blocking=True), y.to(self.info.device, non_blocking=True)
            with self._autocast():
                total += net(input_ids=x, targets=y).loss.double()
        net.train(was_training)
        return float(D.all_reduce_mean(total / n, self.info))

    def _eval_and_log(self) -> float:
        v = self.evaluate()
        if _finite(v):
            self.metrics.log({"kind": "eval", "step": self.step, "tokens": self.tokens, "val_loss": v,
                              "val_ppl": math.exp(min(v, 50))})
        return v

    # ---------------------------------------------------------------------------------------- loop
    def _train_step(self, it) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over ``grad_accum`` micro-batches and clipping; the loss and the gradient norm stay on
        the device (reading them would wait for the whole step)."""
        cfg, info = self.cfg, self.info
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(cfg.grad_accum):
            if self._cudagraphs:
                # compile modes that replay CUDA graphs (reduce-overhead, max-autotune) reuse their output buffers
                # on the next replay: a new micro-batch must be marked as a new step, or accumulating its gradients
                # into the last one's reads overwritten memory (PyTorch raises)
                torch.compiler.cudagraph_mark_step_begin()
            x, y = next(it)
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            sync = contextlib.nullcontext() if not ddp or micro == cfg.grad_accum - 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.model(input_ids=x, targets=y).loss
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_t = D.all_reduce_mean(loss_sum / cfg.grad_accum, info)
        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        return loss_t, gn

    def _check(self, step: int, lr: float, loss: float, gn: float) -> None:
        """Raise :class:`NonFiniteLossError` if step ``step`` had a non-finite loss or gradient norm."""
        if _finite(loss) and _finite(gn):
            return
        what = "loss" if not _finite(loss) else "gradient norm"
        where = (f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else
                 "no checkpoint was written" + ("" if self.out else " (no out_dir)"))
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} (loss {loss}, grad norm {gn}, lr {lr:.3g}): training stopped "
            f"before applying the update; {where}. Lower optimizer.lr, lengthen schedule.warmup or set "
            f"optimizer.grad_clip, then resume.", step, self.last_ckpt)

    def _resolve(self, pending: _StepValues) -> tuple[float, float]:
        """Wait for a step's values and check them: its loss and gradient norm, as floats."""
        loss, gn = pending.get()
        self._check(pending.step, pending.lr, loss, gn)
        return loss, gn

    def _progress_bar(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                        TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
                        disable=not (self.progress and self.info.is_main))

    def run(self) -> Result:
        self.info = D.setup(self.cfg.device)
        try:
            result = self._run()
            # rank 0 may still be writing (curves.png) after the last collective: leave the process group
            # together, or a rank that starts its next run early talks to a peer that is tearing down
            D.barrier(self.info)
            return result
        finally:
            if hasattr(self, "metrics"):
                self.metrics.close()
            D.cleanup(self.info)

    def _run(self) -> Result:
        self._setup()
        cfg, info = self.cfg, self.info
        tps_step = cfg.tokens_per_step(info.world_size)
        end = self.total_steps if self.stop_at_step is None else min(self.total_steps, self.stop_at_step)
        start_step, t0 = self.step, time.perf_counter()
        last_t, last_tokens, tps, train_loss, val_loss = t0, self.tokens, 0.0, float("nan"), float("nan")
        if self.info.is_main and self.console is not None:
            self.console.print(f"model {self.raw.config.pattern_short} · {self.num_params:,} params · "
                               f"{self.total_steps} steps x {tps_step:,} tokens (world {info.world_size}, "
                               f"batch {cfg.batch_size} x accum {cfg.grad_accum} x seq {cfg.seq_len}) · {info.device}")
        self.model.train()
        it = iter(self.train_loader)
        with self._progress_bar() as bar:
            task = bar.add_task("train", total=end, completed=self.step, loss="-", tps="-")
            pending = None  # the last step's values while their check is deferred
            while self.step < end:
                lr = self.optimizer.param_groups[0]["lr"]
                loss_t, gn_t = self._train_step(it)
                values = _StepValues(self.step + 1, lr, loss_t, gn_t)
                if self._defer:
                    # 1.0 makes the fused kernel skip this update (and undo its step count) on the device
                    self.optimizer.found_inf = (~(loss_t.isfinite() & gn_t.isfinite())).float()
                    if pending is not None:  # the previous step, now that this one's work is queued
                        self._resolve(pending)
                    pending = values
                else:
                    loss, gn = self._resolve(values)
                    train_loss = loss
                self.optimizer.step()
                # the fused AdamW (CUDA) updates parameters without bumping their version counters; bump them so
                # caches keyed on versions (HybridLM's meta-token state) see the new weights
                torch.autograd.graph.increment_version(self._params)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.raw.config.weight_norm:
                    from ..weightnorm import normalize_weights

                    normalize_weights(self.raw)
                self.step += 1
                self.tokens += tps_step
                log = self.step % cfg.logging.log_interval == 0 or self.step in (start_step + 1, end)
                evaluate = bool(cfg.eval_interval) and self.step % cfg.eval_interval == 0 and self.step != end
                save = self.out is not None and bool(cfg.checkpoint_interval) and \
                    self.step % cfg.checkpoint_interval == 0 and self.step != end
                if pending is not None and (log or evaluate or save or self.step == end):
                    loss, gn = self._resolve(pending)  # nothing is reported or saved after an unchecked step
                    train_loss, pending = loss, None
                if log:
                    if info.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    tps = (self.tokens - last_tokens) / max(now - last_t, 1e-9)
                    last_t, last_tokens = now, self.tokens
                    self.metrics.log({"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss,
                                      "lr": lr, "grad_norm": gn, "tokens_per_s": tps, "elapsed_s": now - t0})
                    bar.update(task, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
                bar.update(task, completed=self.step)
                if evaluate:
                    val_loss = self._eval_and_log()
                if save:
                    self._save(self.step, self.tokens)
        elapsed = time.perf_counter() - t0
        if self.step > start_step or not self.metrics.evals:
            val_loss = self._eval_and_log()
        elif self.metrics.evals:
            val_loss = self.metrics.evals[-1]["val_loss"]
        if self.out is not None and (self.last_ckpt is None or not self.last_ckpt.endswith(f"step_{self.step:08d}.pt")):
            self._save(self.step, self.tokens)
        if self.out is not None and self.step >= self.total_steps:
            self._export()
        if self.out is not None and info.is_main and self.step >= self.total_steps:
            if plot_curves(self.metrics.history, self.metrics.evals, self.out / "curves.png"):
                self._say(f"loss curves: {self.out / 'curves.png'}")
            else:
                self._say("note: matplotlib is not installed: no curves.png (metrics.jsonl has the numbers)")
        return Result(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)) if _finite(val_loss) else float("nan"),
                      train_loss=train_loss, steps=self.step, tokens=self.tokens, elapsed_s=elapsed,
                      tokens_per_s=(self.step - start_step) * tps_step / max(elapsed, 1e-9),
                      num_params=self.num_params, history=list(self.metrics.history), evals=list(self.metrics.evals),
                      notes=list(self.notes), out_dir=str(self.out) if self.out else None, checkpoint=self.last_ckpt,
                      stopped_early=self.step < self.total_steps, model=self.raw if self.return_model else None)


def train(config, data: str | os.PathLike | None = None, max_tokens: int | None = None,
          out_dir: str | os.PathLike | None = None, **kwargs) -> Result:
    """Train a model in-process and return its :class:`Result` (validation loss first).

    ``config``: a :class:`TrainConfig`, a dict in the YAML layout, a YAML path, or a :class:`HyloConfig`
    (the model; training settings default). ``data``/``max_tokens`` override the config's. Only the
    ``out_dir`` argument counts (a config's ``out_dir`` is ignored here; the CLI passes it): with
    ``out_dir=None`` nothing is written to disk. Other keyword arguments: ``max_steps``, ``resume``,
    ``progress``, ``stop_at_step`` (end early after that step, checkpointing it: the run can be resumed),
    ``return_model``, ``console`` (a rich Console for messages), and any top-level TrainConfig key
    (dicts merge into the ``model``/``optimizer``/``schedule``/``logging`` sections).
    """
    return Trainer(config, data, max_tokens, out_dir, **kwargs).run()
