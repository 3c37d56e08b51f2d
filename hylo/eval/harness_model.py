"""The lm-evaluation-harness model ``hylo``: loglikelihood, rolling loglikelihood and greedy generation.

Importing this module registers the model with lm_eval (it imports lm_eval, so :mod:`hylo.eval.harness` imports
it only when an evaluation runs). ``pretrained`` is anything :func:`hylo.loading.load` opens (a model folder, a
``hylo train`` run folder or a checkpoint ``.pt``) and needs a tokenizer; a non-hylo transformers model works too
(scored the same way, generated with its own ``generate``), which makes side-by-side checks against lm_eval's
``hf`` model easy.

Scoring follows lm_eval's ``hf`` model exactly (tokenization, prefix token, left truncation, which positions are
scored), so numbers are comparable. Requests are sorted by length and batched with right padding: every hylo
operator is causal, so pad tokens after a row's end never change its earlier logits (no attention mask is needed,
and none is passed, since recurrent operators have no notion of one). Only the continuation positions go through
the LM head. Generation runs on :class:`hylo.engine.Engine` (ragged prompts without padding, the decode cache,
CUDA graphs on GPUs); :func:`hylo.eval.harness.generate_greedy` is the one place that knows how.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .common import EvalError, Precision, load_for_eval, prefix_token_id, resolve_device, resolve_precision
from .harness import cut_at_stop, generate_greedy, score_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # when the config does not bound the context (hylo's default max_position_embeddings)
AUTO_BATCH = 64  # rows per batch for batch_size=auto, further bounded by AUTO_BATCH_TOKENS
AUTO_BATCH_TOKENS = 32768
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def _precision(dtype, device: torch.device) -> Precision:
    """``auto``: bf16 weights on CUDA (as ``hylo generate``), fp32 on the CPU; else hylo's names (fp32, bf16, fp16,
    amp-bf16) or torch's (float32, bfloat16, float16)."""
    name = "auto" if dtype is None else _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype))
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return resolve_precision(name, device)


def _int_arg(name: str, v, lo: int = 1) -> int:
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise EvalError(f"{name} must be an int >= {lo}, got {v!r}") from None
    if i < lo or (isinstance(v, float) and v != i):
        raise EvalError(f"{name} must be an int >= {lo}, got {v!r}")
    return i


@register_model("hylo")
class HyloLM(TemplateLM):
    """lm_eval model for hylo checkpoints: ``--model hylo --model_args pretrained=PATH[,tokenizer=...,dtype=...]``.

    model_args: ``pretrained`` (path, or a loaded model with ``tokenizer`` then a tokenizer object), ``tokenizer``
    (a path when the checkpoint has none beside it), ``dtype`` (auto, fp32, bf16, fp16, amp-bf16), ``max_length``
    (context for scoring; default: the config's ``max_position_embeddings`` if bounded, else 2048),
    ``max_gen_toks`` (default 256), ``add_bos_token`` (as lm_eval's ``hf``; default: the tokenizer's own choice),
    ``prefix_token_id``. ``batch_size`` and ``device`` come from lm_eval's own options (``--batch_size`` takes
    an int or ``auto``: up to 64 rows and 32k tokens per batch).
    """

    backend = "causal"

    def __init__(self, pretrained=None, tokenizer=None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 **kwargs):
        super().__init__()
        if kwargs:
            log.warning("hylo: ignoring model_args %s (not used by the hylo model)", sorted(kwargs))
        if pretrained is None:
            raise EvalError("model_args needs pretrained=PATH (a model folder, a `hylo train` run folder or a "
                            "checkpoint .pt)")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("hylo: device %r asked for but CUDA is not available; using the CPU", device)
            device = "cpu"
        dev = resolve_device(device)
        self.precision = _precision(dtype, dev)
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None or isinstance(tokenizer, str):
                raise EvalError("a model object as `pretrained` needs a tokenizer object as `tokenizer`")
            self.model = pretrained.to(device=dev, dtype=self.precision.weights).eval()
            self.tokenizer = tokenizer
        else:
            self.model, self.tokenizer, dev, self.precision = load_for_eval(
                str(pretrained), tokenizer, str(dev), self.precision.name)
        self._device = dev
        self.pretrained = pretrained if isinstance(pretrained, str) else type(pretrained).__name__

        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            self.batch_size = "auto"
            self._rows = _int_arg("max_batch_size", max_batch_size) if max_batch_size else AUTO_BATCH
            self._tokens = AUTO_BATCH_TOKENS
        else:
            self.batch_size = _int_arg("batch_size", 1 if batch_size is None else batch_size)
            self._rows, self._tokens = self.batch_size, None
        self._max_length = _int_arg("max_length", max_length, 2) if max_length is not None else None
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else str(add_bos_token).lower() in ("1", "true", "yes")
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else prefix_token_id_or_fail(self.tokenizer)
        self._engine_cache: dict = {}

    # ------------------------------------------------------------------ lm_eval properties
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return self._prefix if eos is None else int(eos)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and 0 < n < (1 << 20) else DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "precision": self.precision.name,
                "model_type": getattr(self.model.config, "model_type", None), "pretrained": self.pretrained}

    # ------------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if add_special_tokens is None and string.startswith(self.tokenizer.decode([self._prefix])):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **kw))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def score_tokens(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), continuation is the greedy choice)`` per token-list pair; see
        :func:`hylo.eval.harness.score_tokens`."""
        return score_tokens(self.model, rows, max_length=self.max_length, pad_id=self._prefix,
                            batch_rows=self._rows, batch_tokens=self._tokens, precision=self.precision)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # longest first over all requests (as lm_eval's hf model), scored in chunks so the progress bar moves
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list = [None] * len(requests)
        step = max(1, 16 * self._rows)
        for s in tqdm(range(0, len(order), step), disable=disable_tqdm, desc="hylo loglikelihood"):
            idx = order[s:s + step]
            for i, ans in zip(idx, self.score_tokens([requests[i][1:] for i in idx])):
                out[i] = ans
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self._prefix,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append((None,) + make_disjoint_window(w))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hylo generate_until")
        for idx in groups.values():
            kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                log.warning("hylo: generate_until decodes greedily; ignoring sampling settings %s", kw)
            max_ctx = self.max_length - max_new
            if max_ctx < 1:
                raise EvalError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) or [self._prefix] for i in idx]
            rows = self._rows if self.batch_size != "auto" else max(1, min(self._rows, self._tokens // self.max_length))
            with self.precision.context(self.device):
                texts = generate_greedy(self.model, self.tokenizer, prompts, max_new, until, rows, self.max_length,
                                        self._engine_cache)
            for i, text in zip(idx, texts):
                text = cut_at_stop(text, until)
                res[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(1)
        pbar.close()
        return res  # type: ignore[return-value]


def prefix_token_id_or_fail(tok) -> int:
    """BOS, else EOS (lm_eval's ``hf`` rule); a tokenizer with neither cannot score a text's first token."""
    tid = prefix_token_id(tok)
    if tid is None:
        raise EvalError(f"tokenizer {getattr(tok, 'name_or_path', tok)!r} has no BOS nor EOS token; pass "
                        "prefix_token_id=ID in model_args")
    return tid
