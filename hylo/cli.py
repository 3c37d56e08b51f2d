"""The `hylo` command line (typer + rich). Later work adds train, generate, profile, search and eval."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="hylo: hybrid, latency-optimal small language models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
model_app = typer.Typer(help="Inspect model configs.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _register_data_apps() -> None:
    from .cli_data import data_app, tokenizer_app

    app.add_typer(data_app, name="data", help="Tokenize corpora into memory-mapped shards.")
    app.add_typer(tokenizer_app, name="tokenizer", help="Train or inspect tokenizers.")


_register_data_apps()


def _register_train() -> None:
    from .cli_train import train_command

    app.command("train", help="Train a model from a YAML config (single GPU, or under torchrun).")(train_command)


_register_train()


def _register_generate() -> None:
    from .cli_generate import generate_command

    app.command("generate", help="Generate text from a model folder, run folder or checkpoint.")(generate_command)


_register_generate()


def _register_eval() -> None:
    from .cli_eval import eval_app

    app.add_typer(eval_app, name="eval", help="Evaluate models: perplexity, retrieval, MQAR, lm-eval-harness.")


_register_eval()


def _register_profile() -> None:
    from .cli_profile import profile_command

    app.command("profile", help="Latency, throughput and memory on a GPU; per-operator LUT and predictor.")(
        profile_command)


_register_profile()
console = Console()

DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


def load_config(spec: str):
    """A config from a preset name, a config.json, or a directory holding one."""
    from .config import HyloConfig
    from .presets import PRESETS, preset

    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise typer.BadParameter(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json path")
    data = json.loads(path.read_text())
    data.pop("model_type", None)
    return HyloConfig(**data)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def layer_table(model, context: int, dtype_bytes: int = 2) -> Table:
    import torch

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    n_meta = model.num_meta_tokens
    t = Table(title=f"{model.config.pattern_short}", show_lines=False)
    for col in ("layer", "operator", "params", f"state @ {context} tok"):
        t.add_column(col, justify="right" if col != "operator" else "left")
    total_state = 0
    for i, b in enumerate(model.layers):
        n = sum(p.numel() for p in b.parameters())
        sb = b.mixer.state_bytes(context + n_meta, dtype)
        total_state += sb
        t.add_row(str(i), b.op, f"{n:,}", _fmt_bytes(sb) if sb else "-")
    t.add_section()
    t.add_row("", "total", f"{sum(p.numel() for p in model.parameters()):,}", _fmt_bytes(total_state))
    return t


@model_app.command("info")
def model_info(config: str = typer.Argument(..., help="preset name, config.json, or model directory"),
               context: int = typer.Option(8192, help="context length for the decode-state size"),
               dtype: str = typer.Option("bf16", help="dtype of weights and KV cache: bf16, fp16, fp32")):
    """Layer table, parameters per operator and decode-state bytes per sequence at a context length."""
    import torch

    from .model import HybridLM

    if dtype not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {list(DTYPES)}")
    cfg = load_config(config)
    with torch.device("meta"):
        model = HybridLM(cfg)
    console.print(layer_table(model, context, DTYPES[dtype]))
    ops = Table(title="parameters by operator")
    ops.add_column("operator")
    ops.add_column("params", justify="right")
    ops.add_column("share", justify="right")
    by_op = model.num_parameters_by_operator()
    total = sum(by_op.values())
    for k, v in by_op.items():
        ops.add_row(k, f"{v:,}", f"{100 * v / total:.1f}%")
    ops.add_section()
    ops.add_row("total", f"{total:,}", "100%")
    console.print(ops)
    grow = sum(b.mixer.state_bytes(2 * context, torch.bfloat16) - b.mixer.state_bytes(context, torch.bfloat16)
               for b in model.layers)
    console.print(f"decode state per sequence: grows by {_fmt_bytes(grow)} per extra {context} tokens "
                  f"({'KV grows with context' if grow else 'constant: no full-attention KV'})")


@app.command()
def demo(tokens: int = typer.Option(8, help="tokens to generate"), seed: int = typer.Option(0)):
    """Build a tiny hybrid with every operator, run a forward pass and generate a few tokens on the CPU."""
    import torch

    from .model import HybridLM
    from .presets import preset

    torch.manual_seed(seed)
    cfg = preset("tiny-all")
    model = HybridLM(cfg).eval()
    console.print(layer_table(model, context=1024, dtype_bytes=4))
    prompt = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(prompt).logits
        t1 = time.perf_counter()
        cache = model.new_cache(1, prompt.shape[1] + tokens)
        nxt = model(prompt, past_key_values=cache).logits[:, -1].argmax(-1)
        out = [nxt]
        for _ in range(tokens - 1):
            nxt = model.decode_step(nxt, cache).argmax(-1)
            out.append(nxt)
        t2 = time.perf_counter()
        gen = torch.stack(out, 1)
        # the same continuation from full forwards, token by token
        seq = prompt
        for _ in range(tokens):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    ok = torch.equal(seq[:, prompt.shape[1]:], gen)
    console.print(f"forward: logits {tuple(logits.shape)} in {1e3 * (t1 - t0):.1f} ms")
    console.print(f"generated {tokens} tokens with the decode cache in {1e3 * (t2 - t1):.1f} ms: {gen[0].tolist()}")
    console.print(f"cached decoding matches full forwards: [{'green' if ok else 'red'}]{ok}[/]")
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
