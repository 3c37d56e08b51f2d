"""Run by tests/test_gated_bwd.py in a subprocess with TRITON_INTERPRET=1: fla's Triton kernels and hylo's
``dqkwg`` kernel on CPU tensors. Prints one JSON line ``{check: relative error}`` (err = max|a-b| / max|b|).

Three small adaptations of Triton's interpreter let fla 0.6.0's kernels run under it (test-only; they change
nothing when kernels are compiled for a GPU):
- autotuned kernels keep their first config (the interpreter has no driver to benchmark configs with);
- a one-element array converts to a Python index (numpy 2 refuses ``int()`` of a 1-d array);
- a ``for`` loop variable is a Triton scalar, as in compiled code (fla calls ``i_t.to(tl.int64)`` on it).
"""

import ast
import json
import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from triton.runtime import autotuner, interpreter  # noqa: E402

_autotuner_init = autotuner.Autotuner.__init__


def _first_config_only(self, fn, arg_names, configs, *args, **kwargs):
    _autotuner_init(self, fn, arg_names, configs[:1], *args, **kwargs)


autotuner.Autotuner.__init__ = _first_config_only
_patch_tensor = interpreter._patch_lang_tensor


def _patch_tensor_index(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_tensor_index


class _LoopVarsAsTensors(interpreter.ASTTransformer):
    def visit_For(self, node):
        self.generic_visit(node)
        if isinstance(node.target, ast.Name):  # i = i as the loop body's first line: the Assign rule wraps it
            name = node.target.id
            node.body.insert(0, self.visit_Assign(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())],
                                                             value=ast.Name(id=name, ctx=ast.Load()))))
        return node


interpreter.FunctionRewriter.ast_transformer = _LoopVarsAsTensors()

import functools  # noqa: E402

import torch  # noqa: E402

from hylo.ops import chunk_bwd  # noqa: E402
from hylo.ops.delta_rule import delta_rule_chunked, l2norm  # noqa: E402
from hylo.ops.ssd import fla_forward, ssd_chunked  # noqa: E402

torch.set_num_threads(1)
out: dict[str, float] = {}


def err(a, b):
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# --- 1. dqkwg: hylo's Triton kernel and fla's kernel against dqkwg_torch (float32; the interpreter's bf16
#        tl.dot is not exact enough to compare)
def dqkwg_case(name, T, H, HV, K, V, with_w, seed):
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg as fla_dqkwg

    gen = torch.Generator().manual_seed(seed)
    NT = -(-T // 64)
    q, k = rand(gen, 1, T, H, K).float(), (rand(gen, 1, T, H, K) / 4).float()
    v, do, dv = (rand(gen, 1, T, HV, V).float() for _ in range(3))
    w = rand(gen, 1, T, HV, K).float() if with_w else None
    h, dh = rand(gen, 1, NT, HV, K, V).float(), rand(gen, 1, NT, HV, K, V).float()
    gate = -torch.rand(1, NT * 64, HV, generator=gen) * 0.4
    g = (gate.view(1, NT, 64, HV).cumsum(2).view(1, NT * 64, HV)[:, :T] / math.log(2)).contiguous()
    kw = dict(w=w, dv=dv if with_w else None)
    ref = chunk_bwd.dqkwg_torch(q, k, v, do, h, dh, g, 0.7, **kw)
    theirs = fla_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, g=g, scale=0.7, **kw)
    for n, c, b in zip(("dq", "dk", "dw", "dg"), theirs, ref):
        if b is not None:
            out[f"dqkwg_{name}_fla_{n}"] = err(c, b)
    for two_pass in (False, True):  # both variants of hylo's kernel
        chunk_bwd._interp_two_pass = two_pass
        mine = chunk_bwd.dqkwg_triton(q, k, v, do, h, dh, g, 0.7, **kw)
        for n, a, b in zip(("dq", "dk", "dw", "dg"), mine, ref):
            if b is not None:
                out[f"dqkwg_{name}_triton{'_2pass' if two_pass else ''}_{n}"] = err(a, b)
    chunk_bwd._interp_two_pass = False


dqkwg_case("delta", T=100, H=2, HV=2, K=16, V=32, with_w=True, seed=0)
dqkwg_case("gva_gla", T=130, H=1, HV=2, K=32, V=16, with_w=False, seed=1)


# --- 2. whole backward of the gated delta rule (fla's blocks + hylo's dqkwg) vs float64 autograd of
#        hylo's chunked reference: l2norm in the kernel, initial state, final-state gradient, T % 64 != 0
def grads(fn, inputs, weights, dtype):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    y, ht = fn(*leaves)
    loss = (y.double() * weights[0]).sum() + (0 if ht is None else (ht.double() * weights[1]).sum())
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


gen = torch.Generator().manual_seed(2)
B, T, H, K, V = 1, 100, 2, 16, 16
gdn_in = [rand(gen, B, T, H, K), rand(gen, B, T, H, K), rand(gen, B, T, H, V),
          torch.rand(B, T, H, generator=gen, dtype=torch.float64),
          -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.5, rand(gen, B, H, K, V)]
weights = (rand(gen, B, T, H, V), rand(gen, B, H, K, V))
ref = grads(lambda q, k, v, b, g, s: delta_rule_chunked(l2norm(q), l2norm(k), v, b, g, 0.5, s, True),
            gdn_in, weights, torch.float64)
got = grads(lambda q, k, v, b, g, s: chunk_bwd.chunk_gated_delta_rule(
    q, k, v, g, b, scale=0.5, initial_state=s, output_final_state=True, use_qk_l2norm_in_kernel=True),
    gdn_in, weights, torch.float32)
for n, a, b in zip("q k v beta g h0".split(), got, ref):
    out[f"gdn_d{n}"] = err(a, b)


# --- 3. whole backward of SSD through simple GLA: with initial state and final-state gradient, and without
gen = torch.Generator().manual_seed(3)
b, T, H, P, G, N = 1, 100, 2, 16, 1, 16
ssd_in = [rand(gen, b, T, H, P), torch.rand(b, T, H, generator=gen, dtype=torch.float64) * 0.5 + 0.05,
          -torch.rand(H, generator=gen, dtype=torch.float64) - 0.5, rand(gen, b, T, G, N), rand(gen, b, T, G, N),
          rand(gen, b, H, P, N)]
weights = (rand(gen, b, T, H, P), rand(gen, b, H, P, N))
impl = functools.partial(chunk_bwd.chunk_simple_gla, dqkwg="triton")
for final in (True, False):
    inputs = ssd_in if final else ssd_in[:5] + [None]
    ref = grads(lambda *a: ssd_chunked(*a[:5], chunk_size=32, initial_state=a[5], output_final_state=final),
                inputs, weights, torch.float64)
    got = grads(lambda *a: fla_forward(*a[:5], a[5], final, impl=impl), inputs, weights, torch.float32)
    for n, a, r in zip("x dt A B C h0".split(), got, ref):
        if r is not None:
            out[f"ssd{'_final' if final else ''}_d{n}"] = err(a, r)

print(json.dumps(out))
sys.stdout.flush()
