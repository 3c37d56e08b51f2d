"""`hylo data ...` and `hylo tokenizer ...` commands (typer apps registered by hylo.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

data_app = typer.Typer(help="Prepare tokenized training data.", no_args_is_help=True,
                       pretty_exceptions_show_locals=False)
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()


# The callbacks keep each app a command group, so `train`/`prepare` stay subcommands even when run standalone.
@data_app.callback()
def _data() -> None:
    """Prepare tokenized training data."""


@tokenizer_app.callback()
def _tokenizer() -> None:
    """Train tokenizers."""


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


@data_app.command("prepare")
def prepare_cmd(
    inputs: List[str] = typer.Argument(..., help=".txt/.txt.gz/.jsonl/.parquet files, folders, or a HF dataset name"),
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="tokenizer folder or Hugging Face name"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (created atomically)"),
    val_fraction: float = typer.Option(0.01, help="fraction of documents held out for validation"),
    val_docs: Optional[int] = typer.Option(None, help="exact number of held-out documents (overrides the fraction)"),
    seed: int = typer.Option(0, help="seed of the train/val document split"),
    shard_tokens: int = typer.Option(100_000_000, help="start a new shard after this many tokens"),
    dtype: str = typer.Option("auto", help="auto (uint16 if the vocabulary fits), uint16 or uint32"),
    text_field: str = typer.Option("text", help="field/column holding the text in .jsonl/.parquet/datasets"),
    hf_split: str = typer.Option("train", help="split of a Hugging Face dataset input"),
    overwrite: bool = typer.Option(False, help="replace an output folder prepared with other inputs/settings"),
):
    """Tokenize text into memory-mapped shards + manifest.json, holding out whole documents for validation."""
    from .data import DataError, prepare

    try:
        result = prepare(inputs, tokenizer, out, val_fraction=val_fraction, val_docs=val_docs, seed=seed,
                         shard_tokens=shard_tokens, dtype=dtype, text_field=text_field, hf_split=hf_split,
                         overwrite=overwrite)
    except DataError as e:
        _fail(e)
    m = result.manifest
    table = Table(title=f"{result.path}" + (" (up to date, nothing to do)" if result.reused else ""))
    for col in ("split", "documents", "tokens", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in m["splits"].items():
        table.add_row(name, f"{split['documents']:,}", f"{split['tokens']:,}", str(len(split["shards"])))
    console.print(table)
    tok = m["tokenizer"]
    console.print(f"tokenizer {tok['name']} (vocab {tok['vocab_size']:,}, EOS {tok['eos_token']!r} = {tok['eos_id']}), "
                  f"dtype {m['dtype']}, {len(m['inputs'])} input(s)")


@tokenizer_app.command("train")
def train_cmd(
    files: List[str] = typer.Argument(..., help=".txt/.txt.gz/.jsonl/.parquet files or folders"),
    vocab_size: int = typer.Option(32768, help="vocabulary size including <|endoftext|>"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (Hugging Face tokenizer format)"),
    min_frequency: int = typer.Option(2, help="minimum pair count for a merge"),
):
    """Train a byte-level BPE tokenizer with <|endoftext|> as EOS; load it with AutoTokenizer.from_pretrained."""
    from .data import DataError, train_tokenizer

    try:
        tok = train_tokenizer(files, vocab_size, out, min_frequency=min_frequency)
    except DataError as e:
        _fail(e)
    console.print(f"saved tokenizer to {out} (vocab {len(tok):,}, EOS {tok.eos_token!r} = {tok.eos_token_id})")
