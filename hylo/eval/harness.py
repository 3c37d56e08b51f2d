"""lm-evaluation-harness integration: the ``hylo`` model, hylo's offline tasks, and commands that run them.

lm_eval 0.4 finds models only in its own registry (``lm_eval.models``' built-in list plus classes registered by
modules already imported); it has no plugin entry points, so the plain ``lm_eval`` command cannot know ``--model
hylo``. Three ways work:

- ``hylo eval harness run --model hylo --model_args pretrained=PATH --tasks ... [any lm_eval option]``
- ``python -m hylo.eval.harness --model hylo ...``: a drop-in for the ``lm_eval`` command (also ``ls``,
  ``validate`` and ``build-tasks``)
- Python: :func:`simple_evaluate` (lm_eval's, after registering the model), or ``HyloLM`` from this module.

hylo's tasks (``hylo_lastword``, ``hylo_lastword_gen``, ``hylo_nextsent``, ``hylo_ppl``; tag ``hylo``) are
built from a held-out corpus with ``hylo eval harness build-tasks --out DIR`` and used with
``--include_path DIR``; the plain ``lm_eval --model hf --include_path DIR`` runs them on any transformers model.

This module imports neither lm_eval nor torch at import time (the ``hylo`` command imports it on every start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

INSTALL_HINT = "pip install 'hylo[eval]' (or: pip install lm_eval)"


class HarnessError(ValueError):
    """lm_eval missing, tasks not built, or a bad option; the message says what to do."""


# -------------------------------------------------------------------------------------------- scoring, generation
# Plain functions (torch only, imported lazily): the lm_eval model calls them, and so can scripts without lm_eval.
def is_hylo(model) -> bool:
    """A hylo :class:`~hylo.HybridLM` (hidden states, LM head and decode cache as separate calls)."""
    return all(hasattr(model, n) for n in ("hidden_states", "new_cache", "decode_step"))


def length_batches(lengths: list[int], rows: int, tokens: int | None = None) -> list[list[int]]:
    """Indices sorted by length, longest first, cut into batches of at most ``rows`` rows and, if given, at most
    ``tokens`` padded tokens (the first row of a batch is its longest)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < rows and (tokens is None or lengths[out[-1][0]] * (len(out[-1]) + 1) <= tokens):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def score_tokens(model, rows, *, max_length: int, pad_id: int = 0, batch_rows: int = 16,
                 batch_tokens: int | None = None, precision=None, pad_multiple: int = 64) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), whether every continuation token is the argmax)`` per
    ``(context_ids, continuation_ids)``, as lm_eval defines them: one forward over
    ``(context + continuation)[-(max_length + 1):-1]``, scoring its last ``len(continuation)`` positions.

    Rows are sorted by length and right-padded into batches. That is exact for every hylo operator: all are
    causal, so tokens after a row's end never reach its earlier positions (no attention mask needed, and recurrent
    operators have none). hylo models send only the scored positions through the LM head; other transformers
    models are called as usual. ``precision`` (:class:`hylo.eval.common.Precision`) may add bf16 autocast.
    Batch lengths are rounded up to a multiple of ``pad_multiple`` so few distinct shapes reach the kernels (flex
    attention for sliding windows compiles once per shape).
    """
    import torch
    import torch.nn.functional as F

    from .common import EvalError

    L = max_length
    inps, conts = [], []
    for ctx, cont in rows:
        if not cont:
            raise EvalError("a continuation with no tokens cannot be scored")
        if len(cont) > L:
            raise EvalError(f"a continuation of {len(cont)} tokens does not fit max_length={L}")
        inps.append((list(ctx) + list(cont))[-(L + 1):][:-1])
        conts.append(list(cont))
    p = next(model.parameters())
    dev, vocab = p.device, int(model.get_input_embeddings().weight.shape[0])
    res: list = [None] * len(rows)
    for batch in length_batches([len(x) for x in inps], batch_rows, batch_tokens):
        top = max(max(inps[i] + conts[i]) for i in batch)
        if top >= vocab:
            raise EvalError(f"token id {top} is outside the model's embedding ({vocab} rows): the tokenizer does "
                            "not belong to this model (pass tokenizer=PATH)")
        n = len(inps[batch[0]])
        T = max(n, min(-(-n // pad_multiple) * pad_multiple, L))  # never beyond the model's context
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        rb, rt, tgt = [], [], []
        for r, i in enumerate(batch):
            n, c = len(inps[i]), len(conts[i])
            ids[r, :n] = torch.tensor(inps[i])
            rb += [r] * c
            rt += range(n - c, n)
            tgt += conts[i]
        ids = ids.to(dev)
        rb_t, rt_t, tgt_t = (torch.tensor(x, device=dev) for x in (rb, rt, tgt))
        with torch.no_grad(), (precision.context(dev) if precision is not None else _null()):
            if is_hylo(model):
                logits = model.logits(model.hidden_states(ids)[rb_t, rt_t])
            else:
                logits = model(input_ids=ids, use_cache=False).logits[rb_t, rt_t]
        logp = F.log_softmax(logits.float(), dim=-1)
        tok_lp = logp.gather(1, tgt_t[:, None])[:, 0].tolist()
        hit = (logp.argmax(-1) == tgt_t).tolist()
        k = 0
        for i in batch:
            c = len(conts[i])
            res[i] = (float(sum(tok_lp[k:k + c])), bool(all(hit[k:k + c])))
            k += c
    return res


def _null():
    import contextlib

    return contextlib.nullcontext()


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the first occurrence of any non-empty stop string."""
    hits = [j for j in (text.find(s) for s in stops if s) if j >= 0]
    return text[:min(hits)] if hits else text


def generate_greedy(model, tokenizer, prompts, max_new_tokens: int, stop, batch_size: int, max_seq_len: int,
                    engine_cache: dict | None = None) -> list[str]:
    """Greedy continuations (text, cut before the first stop string) of token-id prompts, in order.

    hylo models run on :class:`hylo.engine.Engine` (ragged prompts without padding, the decode cache, CUDA graphs on
    GPUs; one engine kept in ``engine_cache`` and reused while it is big enough), ``batch_size`` prompts per call,
    taken in order of length so that a call holds few distinct lengths (the engine prefills one length at a time);
    other transformers models on their own ``generate``, one prompt at a time. This is the only function that knows
    how generation runs.
    """
    import torch

    stop = [s for s in stop if s]
    if not prompts:
        return []
    if is_hylo(model):
        from ..engine import Engine, SamplingParams

        longest = max(len(p) for p in prompts)
        need = min(max_seq_len, 1 << (longest + max_new_tokens - 1).bit_length())  # a power of two: few rebuilds
        need = max(need, longest + 1)
        cache = engine_cache if engine_cache is not None else {}
        eng = cache.get("engine")
        if eng is None or eng.max_seq_len < need or eng.max_batch_size != batch_size:
            cache.pop("engine", None)
            eng = cache["engine"] = Engine(model, tokenizer, max_batch_size=batch_size, max_seq_len=need)
        sp = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_strings=stop)
        # the engine prefills ragged prompts one length at a time: batches of length-sorted prompts share lengths
        # (500 lm_eval prompts in batches of 32: 205 prefill calls instead of 454)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            for i, o in zip(idx, eng.generate([list(prompts[i]) for i in idx], sp)):
                out[i] = o.text
        return out
    out = []
    dev = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    for p in prompts:
        ids = torch.tensor([list(p)], dtype=torch.long, device=dev)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=eos if eos is not None else 0)
        new = gen[0, len(p):].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        out.append(cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop))
    return out


# -------------------------------------------------------------------------------------------- lm_eval
def load_model():
    """Import lm_eval and register the ``hylo`` model with it; returns the model class."""
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "lm_eval":
            raise HarnessError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
        raise
    from .harness_model import HyloLM

    return HyloLM


def __getattr__(name: str):
    if name == "HyloLM":
        return load_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def simple_evaluate(*args, **kwargs):
    """``lm_eval.simple_evaluate`` with the ``hylo`` model registered (``model="hylo", model_args={...}``).

    Task names of hylo's suite need ``task_manager=lm_eval.tasks.TaskManager(include_path=DIR)``; see
    :func:`task_manager`."""
    load_model()
    import lm_eval

    return lm_eval.simple_evaluate(*args, **kwargs)


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """An ``lm_eval.tasks.TaskManager`` that also knows the tasks built into ``include_path``.

    ``include_defaults=False`` skips indexing lm_eval's ~14,000 built-in task YAMLs (tens of seconds) when only
    the tasks of ``include_path`` are wanted."""
    load_model()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"{include_path}: no such task folder; build one with "
                           "`hylo eval harness build-tasks --out DIR`")
    return TaskManager(include_path=str(include_path) if include_path is not None else None,
                       include_defaults=include_defaults)


# -------------------------------------------------------------------------------------------- command line
def _hint_for(argv: list[str], message: str) -> str:
    if "not found" in message and "task" in message.lower():
        hylo_tasks = any(a.startswith("hylo") for a in _option_values(argv, "--tasks"))
        if hylo_tasks and not any(a.startswith("--include_path") for a in argv):
            return (" (hylo's tasks must be built first: `hylo eval harness build-tasks --out DIR`, then pass "
                    "--include_path DIR)")
        return " (`lm_eval ls tasks` lists the known tasks; add --include_path DIR for a folder of task YAMLs)"
    return ""


def _option_values(argv: list[str], opt: str) -> list[str]:
    """Values of ``opt`` in an argv (``--opt a,b c`` or ``--opt=a``), split on commas."""
    vals: list[str] = []
    taking = False
    for a in argv:
        if a.startswith("-"):
            taking = a == opt
            if a.startswith(opt + "="):
                vals += a.split("=", 1)[1].split(",")
        elif taking:
            vals += a.split(",")
    return vals


def run_lm_eval(argv: list[str]) -> None:
    """Run lm_eval's own command line (``argv`` without the program name) with the ``hylo`` model registered.

    Errors that are the user's (a bad model path, an unknown task, lm_eval missing) exit with one line on
    stderr and status 2 instead of a traceback."""
    from .common import EvalError
    from .tasks.build import TaskBuildError

    try:
        load_model()
        from lm_eval.__main__ import cli_evaluate

        old = sys.argv
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = old
    except (HarnessError, EvalError, TaskBuildError) as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except (ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
        if "not found" not in msg and "Unknown" not in msg and "no model for this name" not in msg:
            raise
        typer.echo(f"error: {msg}{_hint_for(argv, msg)}", err=True)
        raise SystemExit(2) from None


harness_app = typer.Typer(help="lm-evaluation-harness: the `hylo` model and hylo's offline tasks.",
                          no_args_is_help=True)


@harness_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                              "help_option_names": []})
def run_command(ctx: typer.Context) -> None:
    """Run lm_eval with `--model hylo` available; every argument goes to lm_eval (`run --help` shows them).

    Example: hylo eval harness run --model hylo --model_args pretrained=runs/x --tasks hylo --include_path tasks
    """
    run_lm_eval(["run", *ctx.args])


@harness_app.command("build-tasks")
def build_tasks_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the task YAMLs and their jsonl data."),
    corpus: Optional[Path] = typer.Option(None, help="Held-out text: .txt/.txt.gz (books separated by "
                                          "<|endoftext|> lines) or .jsonl, file or folder. Default: "
                                          "$HYLO_EVAL_CORPUS, else shared/data/corpus/gutenberg_val.txt.gz."),
    n: int = typer.Option(500, "--n", help="Examples per task."),
    seed: int = typer.Option(0, help="Seed of the example choice (same inputs and seed: identical files)."),
) -> None:
    """Write hylo's offline tasks (last word, next sentence, perplexity) for lm_eval's --include_path."""
    from .report import print_table
    from .tasks.build import TaskBuildError, build_tasks

    try:
        manifest = build_tasks(out, corpus=corpus, n=n, seed=seed)
    except TaskBuildError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_table(f"tasks in {out} (from {manifest['corpus']})",
                [{"task": t, "examples": v["examples"], "data": v["data"]} for t, v in manifest["tasks"].items()])
    typer.echo(f"run: hylo eval harness run --model hylo --model_args pretrained=PATH --include_path {out} "
               "--tasks hylo")


def register(app: typer.Typer) -> None:
    """Add ``harness`` to ``hylo eval``."""
    app.add_typer(harness_app, name="harness", help="lm-evaluation-harness: `--model hylo` and hylo's tasks.")


def main(argv: list[str] | None = None) -> None:
    """``python -m hylo.eval.harness ARGS``: lm_eval's command line with ``--model hylo``; ``build-tasks ...``
    builds hylo's tasks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "build-tasks":
        typer.main.get_command(harness_app).main(argv, prog_name="python -m hylo.eval.harness")
        return
    run_lm_eval(argv)


if __name__ == "__main__":
    main()
