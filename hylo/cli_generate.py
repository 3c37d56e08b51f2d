"""`hylo generate CHECKPOINT --prompt TEXT [--prompt TEXT ...]`: text in, text out, with the checkpoint's tokenizer.

One prompt streams its continuation to the terminal as it is generated; several prompts run as one batch and
print one panel per result plus the batch's throughput. Register with ``app.command("generate")(generate_command)``.
The Python API is :class:`hylo.engine.Engine`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")


def _dtype(name: str, device: str):
    import torch

    if name not in DTYPE_NAMES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def generate_command(
    checkpoint: str = typer.Argument(..., help="model folder, `hylo train` run folder or checkpoint .pt"),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeat for a batch)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="new tokens per prompt at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1 = off)"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling (reproducible output)"),
    stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable); the text is cut before it"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="do not stop at the tokenizer's EOS token"),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu ... (default: cuda when available)"),
    dtype: str = typer.Option("auto", help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU)"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer folder or name, if not found with the model"),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len",
                                              help="cache length per row (default: longest prompt + new tokens)"),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="capture the decode step (CUDA)"),
    compile: bool = typer.Option(False, "--compile", help="compile the decode step (torch.compile) before capture: "
                                 "faster steps, a slower start; no effect on an attention + FFN model on CUDA, whose "
                                 "step is hylo's own kernels (HYLO_KERNEL_STEP)"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="stream the text of a single prompt"),
):
    """Generate text from a hylo model with its tokenizer (batched, CUDA-graphed decoding on GPUs)."""
    import torch

    from .engine import Engine, SamplingParams
    from .loading import LoadError, load

    console = Console()
    err = Console(stderr=True)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  max_new_tokens=max_new_tokens, stop_strings=tuple(stop), ignore_eos=ignore_eos)
        sampling.validate()
        with err.status(f"loading {checkpoint} ..."):
            model, tok = load(checkpoint, device=dev, dtype=_dtype(dtype, dev), tokenizer=tokenizer,
                              need_tokenizer=True)
        if max_seq_len is None:
            max_seq_len = max(len(tok.encode(p)) for p in prompt) + 1 + max_new_tokens  # +1: a BOS token
        engine = Engine(model, tok, max_batch_size=len(prompt), max_seq_len=max_seq_len,
                        cuda_graphs=cuda_graphs and torch.device(dev).type == "cuda", compile=compile)
        if len(prompt) == 1 and stream:
            console.print(Text(prompt[0], style="dim"), end="")

            def show(row, delta):
                sys.stdout.write(delta)
                sys.stdout.flush()

            outs = engine.generate(prompt, sampling, on_delta=show)
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            with err.status(f"generating for {len(prompt)} prompt(s) ..."):
                outs = engine.generate(prompt, sampling)
            for i, (p, o) in enumerate(zip(prompt, outs)):
                body = Text(p, style="dim")
                body.append(o.text, style="bold")
                console.print(Panel(body, title=f"prompt {i}", title_align="left",
                                    subtitle=f"{len(o.token_ids)} tokens · {o.finish_reason}", subtitle_align="right"))
    except (LoadError, ValueError, TypeError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1)
    s = engine.last_stats
    t = Table(show_header=True, header_style="bold", box=None)
    for col in ("prompts", "prompt tokens", "new tokens", "prefill", "decode", "tokens/s", "decode ms/step", "graphs"):
        t.add_column(col, justify="right")
    ms_step = 1e3 * s["decode_s"] / s["decode_steps"] if s["decode_steps"] else float("nan")
    t.add_row(str(s["batch"]), str(s["prompt_tokens"]), str(s["new_tokens"]), f"{s['prefill_s']:.3f} s",
              f"{s['decode_s']:.3f} s", f"{s['tokens_per_s']:,.1f}", f"{ms_step:.2f}", "yes" if s["graphed"] else "no")
    err.print(t)


generate_app = typer.Typer(pretty_exceptions_show_locals=False)
generate_app.command()(generate_command)

if __name__ == "__main__":
    generate_app()
