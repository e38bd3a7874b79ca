"""Compile every Triton kernel ahead of time for sm_80, sm_90a, sm_100a and sm_120a (no GPU needed) and report, as
JSON lines, registers, shared memory, spills and stack frame (``ptxas -v`` run as Triton runs it: its ptxas and its
flags, see ``PTXAS_FLAGS``; and cuobjdump's local memory and stack of the cubin Triton built), whether it loads
with vector instructions, and for the row and gradient passes the issue slots per 256 logits of each loop
(``issue_slots.py``; a row held whole: its whole body).

Run by tests/backends/test_triton_aot.py in a fresh process, since TRITON_INTERPRET=1 replaces the kernels' JIT objects.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from rankgrpo_kernels.backends.triton import row_pass_kernel as row_pass, segment_loss_kernel as segment_loss  # noqa: E402
from rankgrpo_kernels.backends.triton.tiles import ROW_PASS_CONFIGS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import issue_slots  # noqa: E402

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # cuobjdump
# How triton/backends/nvidia/compiler.py (make_cubin) runs ptxas by default: line info, -v, its register allocator
# workaround for ptxas 13; fp fusion on (TRITON_DEFAULT_FP_FUSION=1 here as in the tests), no extra ptx options.
PTXAS_FLAGS = ("-lineinfo", "-v", "--regAllocOptLevel=2")
# (capability, the ROW_PASS_CONFIGS key the launcher picks on it: sm_90's from Hopper on)
TARGETS = ((80, "sm_80"), (90, "sm_90"), (100, "sm_90"), (120, "sm_90"))


@dataclass(frozen=True)
class Launch:
    num_warps: int
    num_stages: int = 1


def segment_kernels():
    seg = dict(logp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", pw_ptr="*fp32", group_ptr="*i32",
               sorted_ptr="*i32", order_ptr="*i32", normaliser_ptr="*fp32", tokens_ptr="*fp32",
               bin_count_ptr="*fp32", bin_log_w_ptr="*fp32", bin_dloss_ptr="*fp32", grad_ptr="*fp32",
               row_sums_ptr="*fp32", T="i32", beta="fp32", lo="fp32", hi="fp32", delta="fp32",
               log_ratio_limit="fp32", tau_pos="fp32", tau_neg="fp32", k_pos="fp32", lam_pos="fp32", k_neg="fp32",
               lam_neg="fp32", log_w_min="fp32")
    # each policy term (contract.POLICY; delta with PPO's only) with every input and the corrected KL
    return [
        (f"segment_loss[policy={policy}]", segment_loss._segment_loss_kernel, seg,
         dict(HAS_OLD=True, HAS_REF=True, ADD_KL=True, HAS_DELTA=policy == 0, HAS_PW=True, WEIGHTING=2,
              POLICY=policy, KL_CORRECTED=True, THROUGH_RATIO=True, BLOCK_T=segment_loss.BLOCK_T),
         Launch(num_warps=4))  # the launcher's (Triton's default)
        for policy in range(5)
    ]


def row_pass_kernels(arch):
    """(spec, attrs) of the row pass in each shipped configuration: single block (the largest row held in registers),
    two passes, and the write pass of a given lse; for each gradient dtype written (none: statistics only); without
    and with a softcap (",softcap": its own single block, S' held next to p). Then the gradient pass for each
    gradient dtype, without and with a softcap. A bf16 bias and the entropy make every variant the heaviest of its
    kind. Each compiles twice: aligned (what the JIT specialises for V and row stride multiples of 16 and torch's
    16-byte aligned buffers: vector loads) and unaligned (no divisibility known: scalar loads)."""
    specs = []

    def add(name, kernel, signature, constexprs, launch):
        names = list(signature)
        aligned = {(names.index(k),): [["tt.divisibility", 16]] for k in names if not k.endswith("_scale")}
        for suffix, attrs in (("", aligned), (",unaligned", None)):
            specs.append(((f"{name[:-1]}{suffix}]", kernel, signature, constexprs, launch), attrs))

    for grad_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        cfg = ROW_PASS_CONFIGS[(arch, grad_dtype)]
        grad = TRITON_DTYPES.get(grad_dtype, "none")
        grad_ptr = f"*{TRITON_DTYPES.get(grad_dtype, 'fp32')}"
        signature = dict(logits_ptr="*fp32", bias_ptr="*bf16", targets_ptr="*i64", lse_in_ptr="*fp32",
                         logp_ptr="*fp32", lse_ptr="*fp32", entropy_ptr="*fp32", grad_ptr=grad_ptr, V="i32",
                         stride_row="i32", stride_grad="i32", in_scale="fp32", out_scale="fp32", grad_scale="fp32")
        flags = dict(HAS_BIAS=True, WANT_ENTROPY=True, WRITE_GRAD=grad_dtype is not None)
        for softcap in (False, True):
            single_block, single_warps = row_pass.single_block_launch(cfg.single_limit(softcap), cfg, softcap)
            for path, has_lse, single, block, warps in (("single", False, True, single_block, single_warps),
                                                        ("two_pass", False, False, cfg.block_v, cfg.num_warps),
                                                        ("lse_in", True, False, cfg.block_v, cfg.num_warps)):
                add(f"row_pass[{path},{grad}{',softcap' if softcap else ''}]", row_pass._row_pass_kernel, signature,
                    dict(flags, HAS_SOFTCAP=softcap, HAS_LSE=has_lse, SINGLE=single, BLOCK_V=block), Launch(warps))
        if grad_dtype is None:
            continue
        signature = dict(logits_ptr="*fp32", bias_ptr="*bf16", targets_ptr="*i64", lse_ptr="*fp32",
                         entropy_ptr="*fp32", g_ptr="*fp32", e_ptr="*fp32", grad_ptr=grad_ptr, V="i32",
                         stride_row="i32", stride_grad="i32", in_scale="fp32", out_scale="fp32")
        for softcap in (False, True):
            add(f"grad_pass[{grad}{',softcap' if softcap else ''}]", row_pass._grad_pass_kernel, signature,
                dict(HAS_BIAS=True, HAS_SOFTCAP=softcap, BLOCK_V=cfg.block_v), Launch(cfg.num_warps))
    return specs


def compile_one(name, kernel, signature, constexprs, cfg, capability, attrs=None):
    arch = sm_arch_from_capability(capability)
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(kernel, full, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas = subprocess.run([get_ptxas(capability).path, *PTXAS_FLAGS, f"--gpu-name={arch}", str(ptx), "-o",
                                os.devnull], capture_output=True, text=True, check=True).stderr
        usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = issue_slots.sass_of(cubin)
    stack_frame, spill_stores, spill_loads = (int(x) for x in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas).groups())
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    text = compiled.asm["ptx"]
    return dict(kernel=name, arch=arch, registers=int(fields["REG"]), shared=int(fields["SHARED"]),
                local=int(fields["LOCAL"]), stack=int(fields["STACK"]), stack_frame=stack_frame,
                spill_stores=spill_stores, spill_loads=spill_loads, dynamic_shared=compiled.metadata.shared,
                vector_loads=re.search(r"ld\.global[.\w]*\.v[24]\.", text) is not None,
                slots_per_256=slots_per_256(sass, constexprs, cfg) if "BLOCK_V" in constexprs else None)


def slots_per_256(sass, constexprs, cfg):
    """Issue slots per 256 logits of each loop of a row or gradient pass (BLOCK_V columns a step over its
    threads), or of its whole body when it has no loop (the single block)."""
    (code,) = issue_slots.functions(sass).values()
    per_thread = constexprs["BLOCK_V"] / (32 * cfg.num_warps)
    counts = [loop["instructions"] for loop in issue_slots.loops(code)] or [len(code)]
    return [issue_slots.per_256(n, per_thread) for n in counts]


def main():
    for capability, key in TARGETS:
        for spec in segment_kernels():
            print(json.dumps(compile_one(*spec, capability)), flush=True)
        for spec, attrs in row_pass_kernels(key):
            print(json.dumps(compile_one(*spec, capability, attrs=attrs)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
