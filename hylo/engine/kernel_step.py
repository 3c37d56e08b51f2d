"""The decode step of an attention + FFN model as a fixed sequence of hylo's own Triton kernels, chained with
programmatic dependent launch (``HYLO_KERNEL_STEP=on``).

Why: the compiled, graphed step of a Qwen3-0.6B-shaped model takes 1.34-1.37 ms per token on an H100 against a
memory-bandwidth floor of 0.40 ms (``benchmarks/results/qwen3-vs-transformers-h100-run6-partial.json``). Its
products alone are 0.76-0.86 ms for 1.19 GB: each of the ~113 matrices of 4-13 MB pays a kernel's launch,
ramp-up and drain. Inductor's kernels cannot be launched with PDL, so this step has none of them. Per layer:

- attention block: GEMV with the pre-norm fused (q/k/v projection) -> split-KV attention with the q/k/v
  preparation fused in (:func:`hylo.ops.decode_attention.decode_qkv_attention`: qk-norm, RoPE, the new k/v into
  the cache, then attention over slots up to each row's position) -> GEMV with the residual fused (output
  projection);
- FFN block: GEMV with the pre-norm (gate and up) -> GEMV with SwiGLU and the residual (down);

then the final norm fused into the LM head's GEMV: 3 kernels per attention layer (4 where attention splits the
cache), 2 per FFN; the step begins with the embedding lookup and ends with the greedy token and the position
increment (:mod:`hylo.ops.decode_io`, ``HYLO_STEP_IO``). With :mod:`hylo.ops.pdl` on, each kernel is launched with
PDL: a GEMV asks L2 for its weights while the kernel before it finishes, and with ``HYLO_PDL=persistent`` its grid
is persistent (two programs per SM), so that request covers nearly the whole matrix.

Applies to models whose every block is ``attn``/``swa`` or ``ffn`` (SwiGLU) with contiguous weights of one
dtype, at most ``gemv.MAX_ROWS`` rows; :func:`applicable` says why not otherwise. On by default: a runner takes
it wherever it applies and the runner's GEMV is on (CUDA; ``HYLO_KERNEL_STEP=off`` turns it off); it is never
compiled (there is nothing left for inductor), so ``compile=True`` changes nothing for such a model.

Checked on an H100 (``benchmarks/results/engine-check-kstep-h100.json``): in float32, the graphed engine with this
step gives the full forward's greedy tokens for 4 ragged prompts x 32 new tokens (a model with attention, a wrapping
window, FFN and meta tokens); forced decoding's logits differ from the forward's by at most 3e-6.

Measured on an H100 (Qwen3-0.6B shape, random weights, batch 1, cache 80;
``benchmarks/results/qwen3-vs-transformers-h100-run8.json``): 0.904 ms/token (0.942 with a 2048-slot cache),
against 1.443 for the compiled step of PyTorch ops in the same run, and a floor of 0.400. With the attention's
first K/V block loaded before its PDL wait (``HYLO_ATTN_EARLY_KV``, :mod:`hylo.ops.decode_attention`): 0.802
(0.825 at 2048) in a later run (``qwen3-vs-transformers-h100-run13.json``), where with preloading GEMVs the early
block made 0.811 of 0.846; both on, 0.738 (0.744 at 2048) on another machine (``-run14.json``). The timeline
(``benchmarks/results/decode-timeline-h100.json``) shows why it is not faster: the GPU is busy for ~0.90 ms of the
~0.97-ms step, so launch gaps are not the cost; the GEMVs of the small matrices are (the 6.3 MB FFN down projection
takes 6.3 us, ~1 TB/s, against the LM head's 3.1 TB/s)::

    python benchmarks/decode_timeline.py --configs eager,eager+nopdl --out X.json

Two options aimed at what the timeline found won nothing on the H100 and were removed after commit ``d7c3722``
(``benchmarks/results/decode-timeline-h100-run2.json``): ``HYLO_GEMV_SPLIT=on`` (split-K for the products with few
outputs; 0.920 against 0.907 ms/token at cache 80, 0.944 against 0.950 at 2048) and ``HYLO_ATTN_COMBINE=on`` (no
combine kernel; 0.959 at 80 and 1.353 at 2048, where the last split merges 64 partials alone).

An attention kernel that asked L2 for the weights of the kernels after it (the output projection, then the next
FFN block's), right after its wait or once its attention was done (``HYLO_STEP_PREFETCH=early|late``, removed after
commit ``f6dfcb4``) made the step much slower on an H100 (``benchmarks/results/decode-timeline-h100-run3.json``:
1.446 (early) and 1.393 (late) against 0.861 ms/token at cache 80). The attention kernels then lasted ~27 instead
of ~8 us, and the GEMVs after them got no faster: a GEMV of this step is not slow for want of its weights in L2.

What did help is work before the PDL wait, while the kernel before still runs. ``HYLO_GEMV_PRELOAD=on`` (default;
:mod:`hylo.ops.gemv`; not for the LM head, which streams at ~3.1 TB/s) loads each GEMV program's weights into
registers there: 0.792 against 0.909 ms/token on its own (``decode-timeline-h100-run5.json``); beside the early K/V
block 0.809 against 0.799 on one machine (``-run6.json``) but 0.740 against 0.819 on another
(``-run7-elems16384.json``), where the Qwen3 benchmark gave 0.738 against 0.846
(``qwen3-vs-transformers-h100-run14.json``). The FFN block as one kernel with a grid barrier
between its two products was slower (1.014 against 0.916, ``-run4.json``; removed after commit ``3861173``).

Where the 0.740-ms step of ``-run7-elems16384.json`` goes (each role's summed increment of the step's end, cache
80): FFN gate/up 0.163 ms, down 0.145, attention 0.114, q/k/v 0.082, output projection 0.073, combine 0.051, LM
head ~0.10. The floor is 0.40 ms: 1.5x of it (0.60 ms) needs ~5 us less per layer than these 5-6 dependent
kernels take, which is what a persistent kernel (no launches, waits on flags) would have to find.

That attempt lost on an H100 and was removed after commit ``175b3ae`` (``hylo/ops/decode_block.py``,
``HYLO_STEP_BLOCKS``): each FFN block, or every block, as one kernel whose stages were its programs in ticket order,
each loading its weights into registers before waiting on the stage before's counter in memory. It was correct
(bit-equal to this chain under the interpreter; the engine check's float32 case on the H100,
``benchmarks/results/engine-check-kstep-h100-blocks.json``) but slower: 0.857 ms/token (FFN blocks) and 0.877 (all
blocks) against 0.744 at an 80-slot cache (``decode-timeline-h100-run8-blocks.json``); an FFN block took 14.8 us
against 10.5 for the two GEMVs, an attention block 16.0 against 12.1 for its four kernels. A 64-ns back-off between
polls (0.855, ``-run8-blocks-nap.json``) and 8192-weight tiles (0.832 / 0.884, ``-run8-blocks-tile8192.json``) did
not change that. Compiled for sm_90 the kernels held 186 registers per thread (4 warps), two programs per SM, so a
stage's programs could not all hold their weights while the stage before ran.

Blocks that leave their output projection as a float32 sum (:func:`workspace`): the next block's first GEMV,
which needs the whole residual stream after its PDL wait anyway, adds the sum (``gemv_direct(acc=...)``), so a
projection needs no residual read and its programs may split K and add with atomics (whose order makes the float32
sums, and now and then a bf16 logit, differ from run to run; ``HYLO_STEP_ATTN_OUT=off`` for a step that repeats
bit for bit). ``HYLO_STEP_ATTN_OUT=fused`` (the default): attention and projection in one kernel, each program
reading its KV head's whole cache (:mod:`hylo.ops.decode_attn_out`), so for short contexts only: a runner holds a
second step (and graph) without it, taken from :data:`FUSED_MAX_POS` on. ``split``: the split attention's partials
merged by the output projection's own programs (one kernel fewer per layer). ``HYLO_STEP_FFN_SPLIT=on`` (off): the
FFN's down projection in power-of-two chunks of K (no padded rows). Timed on H100s (Qwen3-0.6B shape, bf16,
``python benchmarks/attn_out_check.py``; each line one machine, against the chain in the same process; ms/token):

- positions 16-80: chain 0.801 / 0.734 / 0.710 (``benchmarks/results/attn-out-h100-run3.json``, ``-run5.json``,
  ``-run6-io.json``), ``fused`` + FFN split 0.688 / 0.658 / 0.640, ``split`` + FFN split - / 0.750 / -; on a
  fourth machine, three calls a few minutes apart (``-run7-tiles.json``, ``-run8.json``, ``-run9.json``): chain
  0.674 / 0.690 / 0.716, ``fused`` - / 0.602 / 0.632, ``fused`` + FFN split 0.661 / 0.621 / 0.657, FFN split alone
  - / 0.717 / -;
- longer positions: ``fused`` + FFN split costs ~2.5 us more per step for each position (64 steps from position
  48: 0.703 against the chain's 0.734; from 80: 0.782 against 0.737; from 256: 1.174 against 0.755,
  ``-run6-crossover.json``), so the two cross near position 88, :data:`FUSED_MAX_POS`; ``split`` and FFN split
  matched the chain at 1024-1088 (0.908 and 0.908 against 0.906, ``-run5-pos1024.json``).

The engine check on an H100 with ``fused`` and a limit of 56, so that its 4 ragged prompts cross it while decoding
(``benchmarks/results/engine-check-kstep-h100-fused-partial.json``): in float32 the graphed engine (both graphs)
equals the eager one and the forward's argmax for 32 tokens; its bf16 cases did not fit in the call. (Before commit
``02474c6`` the value ``on`` named ``fused``; the result files of runs 1-4 say ``on`` for it.)

SwiGLU's ``silu(gate) * up`` in the gate/up GEMV's epilogue (``HYLO_STEP_GLU=up``, the default; ``down``: in the
down projection's prologue, on the gate/up product read back): each program of the first GEMV computes matching gate
and up rows, so the second reads half as much after its PDL wait and computes no SiLU; the same roundings, so the
same values. Timed side by side in one process (``benchmarks/results/qwen3-vs-transformers-h100-run19.json``, 8
interleaved rounds, autotuned GEMVs): 0.596 against 0.601 ms/token.

The preloading GEMVs' tiles and warps come from a table per device (:func:`hylo.ops.gemv.fixed_config`,
``HYLO_GEMV_CONFIGS``), timed in this step by ``benchmarks/step_tune.py``, rather than from Triton's autotuner,
which times each config alone and picked differently in each process: on one H100, 0.583 ms/token with the tuned
configs against 0.643 with the autotuner's (``benchmarks/results/step-tune-h100.json``, 6 interleaved rounds). The
autotuner's picks vary between processes, which may be why the step's time varied between calls on one machine
(0.674-0.734 ms/token), while passes within one process agree to within 0.5%.

The step's first and last kernels (``HYLO_STEP_IO=kernels``, the default; :mod:`hylo.ops.decode_io`): the embedding
that zeroes the sums, and after the LM head (whose GEMV packs each row's maximum with an atomic) one that writes the
greedy tokens and advances the positions, instead of PyTorch's embedding, fill, add and ``argmax``: 0.710 against
0.735 and 0.690 against 0.731 ms/token (``-run6-io.json``, ``-run8.json``, ``torchio``).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from hylo.layers.attention import Attention
from hylo.layers.ffn import SwiGLU
from hylo.ops import decode_attention as dattn
from hylo.ops import decode_attn_out as dao
from hylo.ops import decode_io
from hylo.ops import gemv as G
from hylo.ops.backend import Choice
from hylo.ops.rope import inv_freq

_SWITCH = Choice("kernel decode step", "HYLO_KERNEL_STEP", ("off", "on"), "on")
set_kernel_step, get_kernel_step, kernel_step_mode = _SWITCH.set, _SWITCH.get, _SWITCH.use
# attention's output projection into a float32 sum (hylo.ops.decode_attn_out) instead of combine + GEMV: split =
# attention, then one kernel that merges and projects (any context); fused = one kernel (short contexts only: a
# runner leaves it from FUSED_MAX_POS on); the default: faster at positions 16-80 on every H100 timed
_ATTN_OUT = Choice("kernel step's attention with its output projection", "HYLO_STEP_ATTN_OUT",
                   ("off", "split", "fused"), "fused")
set_step_attn_out, get_step_attn_out, step_attn_out_mode = _ATTN_OUT.set, _ATTN_OUT.get, _ATTN_OUT.use
# the FFN's down projection split over K, its products added into a float32 sum for the next block to add
_FFN_SPLIT = Choice("kernel step's FFN down projection into a sum", "HYLO_STEP_FFN_SPLIT", ("off", "on"), "off")
set_step_ffn_split, get_step_ffn_split, step_ffn_split_mode = _FFN_SPLIT.set, _FFN_SPLIT.get, _FFN_SPLIT.use
# SwiGLU's silu(gate) * up: in the down projection's GEMV, on the gate/up product read back ("down"), or in the
# gate/up GEMV's epilogue ("up": each program computes matching gate and up rows, and the down projection reads
# half as much after its PDL wait and computes no SiLU)
_GLU = Choice("kernel step's SwiGLU", "HYLO_STEP_GLU", ("down", "up"), "up")
set_step_glu, get_step_glu, step_glu_mode = _GLU.set, _GLU.get, _GLU.use
# the step's first and last kernels: hylo's (embedding + zeroing the sums; greedy token + position advance,
# hylo.ops.decode_io) or PyTorch's (embedding, zero_, add_; the greedy token then by argmax on the logits)
_IO = Choice("kernel step's first and last kernels", "HYLO_STEP_IO", ("kernels", "torch"), "kernels")
set_step_io, get_step_io, step_io_mode = _IO.set, _IO.get, _IO.use
# HYLO_STEP_ATTN_OUT=fused: a runner takes the fused kernel while its rows' positions (meta tokens included) are
# below this, and the chain's attention from there (a second graph): where the two crossed on an H100
# (benchmarks/results/attn-out-h100-run6-crossover.json, Qwen3-0.6B shape)
FUSED_MAX_POS = int(os.environ.get("HYLO_STEP_FUSED_MAX_POS", 88))


def head_size_ok(hd: int) -> bool:
    """The attention kernel's head sizes: powers of two in 16..256."""
    return 16 <= hd <= 256 and not hd & (hd - 1)


def applicable(model, batch_size: int, head: torch.Tensor) -> str | None:
    """``None`` if :func:`step` computes ``model``'s decode step at ``batch_size``; else why not (for messages)."""
    if batch_size > G.MAX_ROWS:
        return f"batch {batch_size} > {G.MAX_ROWS} rows (the GEMV's limit)"
    dtype = model.embed_tokens.weight.dtype
    for i, block in enumerate(model.layers):
        m = block.mixer
        if isinstance(m, Attention):
            linears = (m.qkv_proj, m.o_proj)
            hd = m.head_dim
            if not head_size_ok(hd):
                return f"layer {i}: head size {hd} (the attention kernel takes powers of two in 16..256)"
        elif isinstance(m, SwiGLU):
            linears = (m.gate_up_proj, m.down_proj)
        else:
            return f"layer {i} is {block.op!r} (only attn, swa and ffn blocks)"
        if not all(lin.weight.is_contiguous() for lin in linears):
            return f"layer {i}: non-contiguous weights"
        if any(p.dtype != dtype for p in block.parameters()):
            return f"layer {i}: parameters of another dtype than the embedding's ({dtype})"
    if model.norm.weight.dtype != dtype or head.dtype != dtype or not head.is_contiguous():
        return "the final norm or the LM head differs in dtype or is not contiguous"
    return None


def config_applicable(config, batch_size: int) -> bool:
    """Whether a model of ``config`` would take the step at ``batch_size`` (:func:`applicable` on what a config
    says: block kinds, head size, rows), for the predictor, which builds no model."""
    attn = any(op in ("attn", "swa") for op in config.layers)
    return (batch_size <= G.MAX_ROWS and all(op in ("attn", "swa", "ffn") for op in config.layers)
            and (not attn or head_size_ok(config.attn_head_dim)))


def enabled(model, batch_size: int, head: torch.Tensor, gemv_on: bool) -> bool:
    """Whether a runner takes :func:`step`: the switch is on, the runner's GEMV is on and :func:`applicable`."""
    return _SWITCH.value == "on" and gemv_on and applicable(model, batch_size, head) is None


def frequencies(model) -> dict[int, torch.Tensor]:
    """RoPE's frequencies per attention layer index (float32, on the model's device), computed once per runner."""
    dev = model.embed_tokens.weight.device
    return {i: inv_freq(b.mixer.head_dim, b.mixer.rope_theta, dev) for i, b in enumerate(model.layers)
            if isinstance(b.mixer, Attention)}


def workspace(model, batch_size: int) -> dict | None:
    """The float32 sums that blocks leave for the next block's first GEMV to add (:func:`first_gemv`), where
    ``HYLO_STEP_ATTN_OUT`` (attention's output projection into the sum, :mod:`hylo.ops.decode_attn_out`) is ``split``
    or ``fused`` or ``HYLO_STEP_FFN_SPLIT`` (the FFN's down projection split over K into the sum) is ``on`` (read
    here, when a runner builds its step) and the preloading GEMV takes rows of the hidden size:
    ``{"sums": [layers, B, hidden] float32, "attn": "split" | "fused" | None, "ffn": bool}``, the sums zeroed at the
    start of each step; else ``None``."""
    D = model.embed_tokens.weight.shape[1]
    attn = _ATTN_OUT.value != "off" and any(isinstance(b.mixer, Attention) for b in model.layers[:-1])
    ffn = _FFN_SPLIT.value == "on" and all(G.split_chunk(b.mixer.down_proj.weight.shape[1]) >= 16
                                           for b in model.layers[:-1] if isinstance(b.mixer, SwiGLU)) \
        and any(isinstance(b.mixer, SwiGLU) for b in model.layers[:-1])
    if not (attn or ffn) or not G.preload_applies(D):
        return None
    sums = torch.zeros(len(model.layers), batch_size, D, dtype=torch.float32, device=model.embed_tokens.weight.device)
    return {"sums": sums, "attn": _ATTN_OUT.value if attn else None, "ffn": ffn}


def new_io(batch_size: int, device) -> torch.Tensor | None:
    """The greedy-token buffer of :func:`step` (:func:`hylo.ops.decode_io.new_io`) where ``HYLO_STEP_IO=kernels``
    (read here, when a runner builds its step); else ``None``."""
    return decode_io.new_io(batch_size, device) if _IO.value == "kernels" else None


def glu_up(model) -> bool:
    """Whether :func:`step` computes SwiGLU in the gate/up GEMV (``HYLO_STEP_GLU=up``, read here, when a runner
    builds its step): the switch is ``up`` and the preloading GEMV takes rows of the hidden size."""
    return _GLU.value == "up" and G.preload_fits(model.embed_tokens.weight.shape[1])


def gemv_launcher(pdl: bool, persistent: bool = False):
    """The step's GEMV: :func:`hylo.ops.gemv.gemv_direct` launched with PDL and on persistent grids as asked."""
    return functools.partial(G.gemv_direct, pdl=pdl, persistent=persistent)


def first_gemv(gemv, h: torch.Tensor, acc: torch.Tensor | None, lin, norm, **kw):
    """A block's first GEMV (pre-norm): ``(output, block input)``. With ``acc``, the block before left its output
    projection as that float32 sum: the GEMV adds it to ``h`` first and returns the sum as the input. ``kw``:
    more of :func:`hylo.ops.gemv.gemv_direct`'s options (``glu``)."""
    if acc is None:
        return gemv(h, lin.weight, lin.bias, norm.weight, norm.eps, **kw), h
    h_in = torch.empty_like(h)
    return gemv(h, lin.weight, lin.bias, norm.weight, norm.eps, acc=acc, h_out=h_in, **kw), h_in


def ffn_block(block, h: torch.Tensor, gemv, acc: torch.Tensor | None = None,
              out_acc: torch.Tensor | None = None, glu: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An FFN block: ``h + down(SwiGLU(gate_up(norm(h))))`` as two GEMVs (pre-norm, then SwiGLU and residual):
    ``(output, None)``. ``acc``: see :func:`first_gemv`. With ``out_acc`` (a zero float32 ``[B, D]``) the down
    projection is added into it instead (split over K, no residual): ``(block input, out_acc)``. ``glu``: SwiGLU
    in the first GEMV's epilogue (:func:`glu_up`) instead of the second's prologue."""
    n, m = block.norm, block.mixer
    kw = {"glu": True} if glu else {}
    gu, h = first_gemv(gemv, h, acc, m.gate_up_proj, n, **kw)
    swiglu = not glu
    if out_acc is not None:
        return h, gemv(gu, m.down_proj.weight, m.down_proj.bias, swiglu=swiglu, out_acc=out_acc)
    return gemv(gu, m.down_proj.weight, m.down_proj.bias, residual=h, swiglu=swiglu), None


def attn_block(block, h: torch.Tensor, st: dict, pos: torch.Tensor, inv_freq: torch.Tensor, gemv,
               pdl: bool, acc: torch.Tensor | None = None, out_acc: torch.Tensor | None = None,
               fused: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention block: q/k/v GEMV (pre-norm), attention with its q/k/v preparation and cache write, output
    GEMV (residual): ``(output, None)``. ``h [B, D]``; writes the new key and value at ``pos``. ``acc``: see
    :func:`first_gemv`. With ``out_acc`` (a zero float32 ``[B, D]``) the output projection is left in ``out_acc``
    for the next block's first GEMV to add, and ``(block input, out_acc)`` returned: computed after the split
    attention by the kernel that merges its partials (:func:`hylo.ops.decode_attn_out.decode_attn_split_out`), or
    with ``fused`` in one kernel with attention (:func:`hylo.ops.decode_attn_out.decode_attn_out`)."""
    n, m = block.norm, block.mixer
    qkv, h = first_gemv(gemv, h, acc, m.qkv_proj, n)
    qn, kn = (m.q_norm.weight, m.k_norm.weight) if m.qk_norm else (None, None)
    eps = m.q_norm.eps if m.qk_norm else 0.0
    if out_acc is not None:
        f = dao.decode_attn_out if fused else dao.decode_attn_split_out
        return h, f(qkv, m.num_heads, qn, kn, eps, inv_freq, st["k"], st["v"], pos, m.window is not None,
                    m.o_proj.weight, m.o_proj.bias, out_acc, pdl)
    o = dattn.decode_qkv_attention(qkv, m.num_heads, qn, kn, eps, inv_freq, st["k"], st["v"], pos,
                                   ring=m.window is not None, pdl=pdl)
    return gemv(o.view(h.shape[0], -1), m.o_proj.weight, m.o_proj.bias, residual=h), None


def head_logits(h: torch.Tensor, head: torch.Tensor, norm, gemv, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """The final norm inside the LM head's GEMV: ``[B, D] -> [B, vocab]``; ``argmax``: each row's packed maximum
    goes there too (:mod:`hylo.ops.decode_io`)."""
    if argmax is not None:
        return gemv(h, head, None, norm.weight, norm.eps, argmax=argmax)
    return gemv(h, head, None, norm.weight, norm.eps, preload=False)  # bandwidth-bound: the plain GEMV


def step(model, tokens: torch.Tensor, states, pos: torch.Tensor, head: torch.Tensor,
         freqs: dict[int, torch.Tensor], pdl: bool, persistent: bool = False,
         ws: dict | None = None, io: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """One decode step: ``tokens [B]`` -> logits ``[B, vocab]``; writes the caches and advances ``pos``. ``pdl``:
    launch every kernel with PDL; ``persistent``: the GEMVs on persistent grids (``HYLO_PDL=persistent``; under the
    interpreter it shrinks their grids even without PDL, so CPU tests cover that indexing); ``ws``
    (:func:`workspace`): blocks but the last leave their output projection as a float32 sum that the next block's
    first GEMV adds (attention blocks where ``ws["attn"]`` is set, FFN blocks with ``ws["ffn"]``); ``io``
    (:func:`new_io`): the step begins and ends with :mod:`hylo.ops.decode_io`'s kernels and leaves each row's greedy
    token in ``io[1]``; ``glu`` (:func:`glu_up`): FFN blocks compute SwiGLU in their gate/up GEMV."""
    gemv = gemv_launcher(pdl, persistent)
    sums = ws["sums"] if ws is not None else None
    if io is not None:
        h = decode_io.embed_rows(tokens, model.embed_tokens.weight, sums)  # [B, D], the sums zeroed
    else:
        if sums is not None:
            sums.zero_()
        h = F.embedding(tokens.view(-1), model.embed_tokens.weight)
    acc = None  # the float32 sum the block before left for this one to add
    last = len(model.layers) - 1
    for i, (block, st) in enumerate(zip(model.layers, states)):
        ffn = isinstance(block.mixer, SwiGLU)
        out = ws["sums"][i] if ws is not None and i < last and ws["ffn" if ffn else "attn"] else None
        if ffn:
            h, acc = ffn_block(block, h, gemv, acc, out, glu)
        else:
            h, acc = attn_block(block, h, st, pos, freqs[i], gemv, pdl, acc, out, ws is not None and
                                ws["attn"] == "fused")
    logits = head_logits(h, head, model.norm, gemv, None if io is None else io[0])
    if io is not None:
        decode_io.finish(io, pos, pdl)
    else:
        pos.add_(1)
    return logits

