"""`DecodeRunner`: a static decode cache and one decode step for a fixed batch size, optionally a CUDA graph.

Every decode step of a hylo model has static shapes (``HybridLM.decode_step``: per-row positions live in the
tensor ``cache.pos``, KV caches are preallocated to ``max_len``, recurrent states are fixed-size), so the whole
step -- embedding, every layer, final norm, LM head -- can be captured once and replayed: one graph launch per
token instead of hundreds of kernel launches from Python, which is what bounds small-model decoding.

The runner is the low-level piece the engine and the profiler share:

    runner = DecodeRunner(model, batch_size=8, max_len=4096)     # graphed on CUDA, eager elsewhere
    runner.set_positions(1024)                                   # every row holds 1024 tokens of context
    logits = runner.step(tokens)                                 # tokens LongTensor[8] -> logits [8, V]

Positions are counted in *real* tokens (meta tokens excluded): after ``reset()`` a row is at position 0 and
holds only the meta-token state. ``step`` writes each row's token at its own position and advances every row
by one. Note that attention's decode step attends over the whole preallocated ``max_len`` (masked), so its cost
depends on ``max_len``, not on the current position -- unless ``HYLO_DECODE_ATTN=on``
(:mod:`hylo.ops.decode_attention`), whose kernel reads each row's cache only up to its position.

``HYLO_KERNEL_STEP`` (:mod:`hylo.engine.kernel_step`; on by default, taken where the GEMV is, i.e. on CUDA) runs an
attention + FFN model's step as a fixed sequence of hylo's Triton kernels chained with programmatic dependent
launch; ``compile`` is then ignored. With ``HYLO_STEP_ATTN_OUT=fused`` (the default) the runner holds two steps
and graphs, one with attention and its output projection as one kernel for positions below
``kernel_step.FUSED_MAX_POS`` and the chain's for the rest (checked on an H100 through the engine).

``compile=True`` runs the step through ``torch.compile`` (inductor) before the graph is captured, as gpt-fast
does: a graph of eager kernels still pays one small kernel per norm, RoPE, gate and residual add; inductor fuses
them, which is what brings decoding at batch 1 near the memory-bandwidth floor. The states are updated in place
(inductor re-inplaces the cache writes; ``tests/test_engine.py`` checks compiled == eager). Compiling the whole
step of a deep model takes long (Qwen3-0.6B's 28 layers: 40.9 s on the CPU with a cold cache, over 4 minutes on
an H100 machine in 2026-12); ``HYLO_COMPILE_SCOPE=block`` compiles each kind of block once and reuses it (11.1 s
on the CPU, ``benchmarks/results/compile-scope-cpu.json``), at the price of no fusion across block boundaries;
off (``step``) by default: on an H100 the block-scoped step took 1.443 ms/token for Qwen3-0.6B's shape
(``benchmarks/results/qwen3-vs-transformers-h100-run8.json``), its compile time not recorded.

On CUDA (``HYLO_GEMV=auto``, the default; ``off`` turns it off; :mod:`hylo.ops.gemv`, read when a runner is
built) the step's matrix products -- every ``nn.Linear`` of the model while the step runs, and the LM head -- go
through a Triton matrix-vector kernel for buckets of up to four rows: batch-1 decoding is bound by reading the
weights, which cuBLAS does at about half the copy bandwidth on these small matrices. Prefill and training never
go through the runner's step.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch

from ..cache import HybridCache
from ..ops import gemv, pdl
from ..ops.backend import Choice
from . import fused, kernel_step


_SCOPE = Choice("what compile=True compiles", "HYLO_COMPILE_SCOPE", ("step", "block"), "step")
set_compile_scope, get_compile_scope, compile_scope_mode = _SCOPE.set, _SCOPE.get, _SCOPE.use


def _block_step(block, x, state, pos):
    return block.step(x, state, pos)


@functools.lru_cache(maxsize=None)
def _compiled_block_step(mode: bool | str):
    """``HYLO_COMPILE_SCOPE=block``: one compiled function for a block's decode step. Dynamo takes the block's
    parameters and states as inputs and guards on its structure, so the 28 attention blocks of a Qwen3-shaped
    model share one graph (inductor compiles each kind of block once) instead of one graph of all 28."""
    return torch.compile(_block_step, dynamic=False, **({} if mode is True else {"mode": mode}))


def row_view(cache: HybridCache, start: int, stop: int) -> HybridCache:
    """A cache over rows ``start:stop`` of ``cache`` that shares its storage (states and ``pos``).

    Writes through the view (prefill of some rows, a decode step of the first rows) land in ``cache``. The
    view's ``seq_len`` is the meta-token count: set it to the rows' common length before a prefill.
    """
    if not 0 <= start < stop <= cache.batch_size:
        raise ValueError(f"rows {start}:{stop} are outside the cache's batch of {cache.batch_size}")
    states = [{k: t[start:stop] for k, t in st.items()} for st in cache.states]
    view = HybridCache(states, stop - start, cache.max_len, num_meta_tokens=cache.num_meta_tokens)
    view.pos = cache.pos[start:stop]
    view.seq_len = cache.num_meta_tokens
    return view


@torch.no_grad()
def reset_cache(model, cache: HybridCache) -> None:
    """Every row back to the state right after the meta tokens (zeros without them), at position 0."""
    n = cache.num_meta_tokens
    for st in cache.states:
        for t in st.values():
            t.zero_()  # attention KV too: stale entries are masked, but a stale NaN would still poison softmax@V
    if n:
        for block, src, dst in zip(model.layers, model._meta_state(), cache.states):
            block.mixer.copy_state(src, dst, n)
    cache.pos.fill_(n)
    cache.seq_len = n


def _positions(pos, batch_size: int) -> list[int]:
    if isinstance(pos, torch.Tensor):
        pos = pos.tolist()
    if isinstance(pos, int):
        return [pos] * batch_size
    pos = [int(p) for p in pos]
    if len(pos) != batch_size:
        raise ValueError(f"set_positions takes one int or {batch_size} positions (one per row), got {len(pos)}")
    return pos


class DecodeRunner:
    """Static cache + one decode step for a fixed batch size, optionally captured as a CUDA graph.

    ``cuda_graph=None`` captures on CUDA devices and runs eagerly elsewhere. ``cache`` lets several runners share
    one cache (e.g. ``row_view(big, 0, b)`` for a batch bucket ``b``); by default the runner builds
    ``model.new_cache(batch_size, max_len)``. ``pool`` is a CUDA graph memory pool shared between captures.
    When graphed, ``step`` returns a static output buffer that the next ``step`` overwrites. ``compile``: ``True``
    or a ``torch.compile`` mode (e.g. ``"max-autotune-no-cudagraphs"``) compiles the step first. The runner reads
    the weights at every step, except a weight-normalized LM head, normalized once here: build a new runner (or
    engine) after changing the weights of such a model.
    """

    cache: HybridCache

    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool | None = None, *,
                 cache: HybridCache | None = None, pool=None, warmup: int = 2, compile: bool | str = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        for name in ("new_cache", "decode_step"):
            if not hasattr(model, name):
                raise TypeError(f"DecodeRunner needs a hylo HybridLM (new_cache/decode_step); got "
                                f"{type(model).__name__}")
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {self.device}")
        if cache is None:
            cache = model.new_cache(batch_size, max_len)
        elif cache.batch_size != batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the runner was asked for {batch_size}")
        self.cache = cache
        self.num_meta_tokens = cache.num_meta_tokens
        self.max_len = cache.max_len - cache.num_meta_tokens  # real tokens
        self._max_pos = cache.num_meta_tokens  # host-side upper bound of the rows' absolute positions
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None
        self._io: torch.Tensor | None = None  # the kernel step's greedy tokens (HYLO_STEP_IO=kernels)
        self.graph: torch.cuda.CUDAGraph | None = None
        # HYLO_STEP_ATTN_OUT=fused: a second step (and graph) without it, taken once positions reach fused_limit
        self._long = False  # which of the two steps _fn computes (read when it runs or is captured)
        self._graphs: dict[bool, tuple] = {}  # long -> (graph, static logits)
        self.fused_limit: int | None = None
        self.glu_up = False  # the kernel step's SwiGLU in the gate/up GEMV (HYLO_STEP_GLU=up)
        self.gemv = gemv.enabled(self.device)
        # scoped to each call of the step (traced or captured inside it), so nothing outside the step sees it
        self._linears = gemv.gemv_linears(model) if self.gemv else contextlib.nullcontext()
        self._fn = self._make_step(compile)
        if cuda_graph:
            self._capture(pool, warmup)
        else:
            self.reset()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Back to the meta-token state, every row at position 0."""
        reset_cache(self.model, self.cache)
        self._max_pos = self.num_meta_tokens

    def set_positions(self, pos: int | Sequence[int] | torch.Tensor) -> None:
        """Put row(s) at context length ``pos`` (real tokens; one int for all rows or one per row), e.g. to time
        decoding at a given context. The states are left as they are (their values do not change the cost)."""
        ps = _positions(pos, self.batch_size)
        if min(ps) < 0 or max(ps) >= self.max_len:
            raise ValueError(f"positions must lie in [0, {self.max_len - 1}] (the cache holds {self.max_len} "
                             f"tokens and a step writes one more); got min {min(ps)}, max {max(ps)}")
        n = self.num_meta_tokens
        self.cache.pos.copy_(torch.tensor(ps, dtype=torch.long) + n)
        self._max_pos = n + max(ps)
        self.cache.seq_len = self._max_pos

    def positions(self) -> list[int]:
        """Each row's current context length in real tokens (a host sync)."""
        return [p - self.num_meta_tokens for p in self.cache.pos.tolist()]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """Feed one token per row (``LongTensor[B]``), advance every row by one; returns logits ``[B, V]``, or with
        ``greedy`` each row's next greedy token (``LongTensor[B]``, the logits' argmax, first index on ties):
        computed inside the step where the kernel step runs (:mod:`hylo.ops.decode_io`), then a buffer that the
        next step overwrites (it may be fed back as ``tokens``; clone it to keep it)."""
        if self._max_pos >= self.cache.max_len:
            raise ValueError(f"the cache is full: a row is at position {self._max_pos - self.num_meta_tokens} of "
                             f"{self.max_len}; reset() or set_positions() first")
        if tokens.shape != (self.batch_size,):
            raise ValueError(f"step takes LongTensor[{self.batch_size}] (one token per row), got shape "
                             f"{tuple(tokens.shape)}")
        out = self._step(tokens)
        self._max_pos += 1
        return self.greedy_tokens(out) if greedy else out

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy tokens of the step that just returned ``logits``: the kernel step's own (a buffer that the
        next step overwrites; :mod:`hylo.ops.decode_io`), else ``logits.argmax(-1)``."""
        return self._io[1] if self._io is not None else logits.argmax(-1)

    # ------------------------------------------------------------------ internals
    def _make_step(self, mode: bool | str):
        """``tokens -> logits`` over this runner's cache: the same computation as ``decode_step`` without its
        host-side bookkeeping (``seq_len``, which compiled would be a guard on a Python int and recompile at every
        position), with the weight-normalized head computed once here; compiled when ``mode`` is set."""
        model, states, pos = self.model, self.cache.states, self.cache.pos
        with torch.no_grad():
            head = model.head_weight()
        linear = gemv.linear if self.gemv else torch.nn.functional.linear
        # HYLO_KERNEL_STEP=on: the whole step as hylo's own Triton kernels (PDL-chained), never compiled
        self.kernel_step = kernel_step.enabled(model, self.batch_size, head, self.gemv)
        self.sums_ws = None  # the kernel step's float32 sums (HYLO_STEP_ATTN_OUT, HYLO_STEP_FFN_SPLIT), where taken
        self.pdl = self.kernel_step and pdl.enabled(self.device)
        self.fused = (not self.kernel_step and self.gemv and fused.enabled(model, self.batch_size)
                      and head.is_contiguous() and head.dtype == model.embed_tokens.weight.dtype)
        if self.kernel_step:
            freqs, persistent = kernel_step.frequencies(model), pdl.persistent()
            ws = self.sums_ws = kernel_step.workspace(model, self.batch_size)
            ws_long = ws
            if ws is not None and ws["attn"] == "fused":  # past fused_limit positions: the chain's attention
                self.fused_limit = kernel_step.FUSED_MAX_POS
                ws_long = {**ws, "attn": None} if ws["ffn"] else None
            self._io = kernel_step.new_io(self.batch_size, self.device)
            self.glu_up = kernel_step.glu_up(model)
            return lambda tokens: kernel_step.step(model, tokens, states, pos, head, freqs, self.pdl, persistent,
                                                   ws_long if self._long else ws, self._io, self.glu_up)
        plan = [fused.fusable(b) for b in model.layers]

        def make(block_step):
            def step(tokens: torch.Tensor) -> torch.Tensor:
                if self.fused:  # HYLO_GEMV_FUSE=on: norms, SwiGLU and residual adds inside the GEMVs
                    return fused.step(model, tokens, states, pos, head, plan)
                x = model.embed_tokens(tokens.view(-1, 1))
                for block, st in zip(model.layers, states):
                    x = block_step(block, x, st, pos)
                pos.add_(1)
                return linear(model.norm(x), head)[:, 0]
            return step
        step = make(_block_step)

        if not mode:
            return step
        # every runner compiles the same code object with other closure tensors: one dynamo cache entry per
        # runner (batch bucket), so let an engine's buckets exceed the default limit of 8 entries
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        kw = {} if mode is True else {"mode": mode}
        self.compile_scope = "step" if self.fused else _SCOPE.value
        if self.compile_scope == "step":
            return torch.compile(step, dynamic=False, **kw)
        return make(_compiled_block_step(mode))  # one graph per kind of block, shared by its repeats

    def _call(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step on the cache; ``seq_len`` (one number for all rows) only has to pass the capacity check."""
        with self._linears:
            out = self._fn(tokens)
        self.cache.seq_len += 1
        return out

    def _step(self, tokens: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """The step without host-side position checks (the engine keeps its own exact accounting and passes
        ``max_pos``, an upper bound of the rows' absolute positions, which picks the step where there are two)."""
        p = self._max_pos if max_pos is None else max_pos
        long = self.fused_limit is not None and p >= self.fused_limit
        if self.graph is None:
            self.cache.seq_len = min(self._max_pos, self.cache.max_len - 1)
            self._long = long
            return self._call(tokens.to(self.device))
        graph, logits = self._graphs[long]
        self._tokens.copy_(tokens, non_blocking=True)
        graph.replay()
        return logits

    @torch.no_grad()
    def _capture(self, pool, warmup: int) -> None:
        n = self.num_meta_tokens
        self.reset()
        self.cache.seq_len = n
        for long in (False, True) if self.fused_limit is not None else (False,):
            self._long = long
            # warm up on a side stream (lazy initialisations, kernel selection) as torch.cuda.graphs requires;
            # positions are put back after each step so a tiny max_len cannot overflow
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self._call(self._tokens)
                    self.cache.pos.fill_(n)
                    self.cache.seq_len = n
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._call(self._tokens)
            if self.fused_limit is not None:
                pool = graph.pool()  # the second graph shares the first's memory pool
            self._graphs[long] = (graph, logits)
            self.cache.seq_len = n
        self.graph, self._logits = self._graphs[False]
        self._long = False
        self.reset()  # warm-up steps wrote junk into the states
