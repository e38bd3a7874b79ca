"""Compile every Triton kernel ahead of time for sm_90a and sm_80 (no GPU needed) and report, as JSON lines,
registers, shared memory, spills (``ptxas -v`` with the ptxas Triton itself uses, and cuobjdump's local memory)
and which matrix instructions it uses.

Run by tests/test_triton_aot.py in a fresh process, since TRITON_INTERPRET=1 replaces the kernels' JIT objects.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from rankgrpo_kernels.kernels import logprob_backward, logprob_forward, segment_loss  # noqa: E402
from rankgrpo_kernels.kernels.tiles import CONFIGS, KernelConfig, dot_precision  # noqa: E402

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # cuobjdump


def blocks(cfg):
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)


def head_kernels(arch, dtype):
    """(name, kernel, signature, constexprs, uses_matrix_units, config) of the GEMM kernels for one input dtype."""
    ptr = f"*{TRITON_DTYPES[dtype]}"
    precision = dot_precision(dtype)
    forward_cfg, backward_cfg = CONFIGS[(arch, dtype)]
    forward = dict(hidden_ptr=ptr, weight_ptr=ptr, bias_ptr=ptr, targets_ptr="*i64", max_ptr="*fp32",
                   sum_exp_ptr="*fp32", sum_exp_z_ptr="*fp32", target_logit_ptr="*fp32", N="i32", V="i32", H="i32",
                   stride_h="i32", stride_w="i32", vocab_per_split="i32", inv_temperature="fp32")
    backward = dict(hidden_ptr=ptr, weight_ptr=ptr, bias_ptr=ptr, targets_ptr="*i64", lse_ptr="*fp32",
                    grad_ptr="*fp32", order_ptr="*i64", count_ptr="*i64", d_hidden_ptr="*fp32",
                    d_weight_ptr="*fp32", d_bias_ptr="*fp32", V="i32", H="i32", stride_h="i32", stride_w="i32",
                    inv_temperature="fp32")
    return [
        (f"logprob_partials[{TRITON_DTYPES[dtype]}]", logprob_forward._logprob_partials_kernel, forward,
         dict(HAS_BIAS=True, WITH_ENTROPY=True, PRECISION=precision, **blocks(forward_cfg)), True, forward_cfg),
        (f"logprob_backward[{TRITON_DTYPES[dtype]}]", logprob_backward._logprob_backward_kernel, backward,
         dict(HAS_BIAS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, PRECISION=precision, **blocks(backward_cfg)),
         True, backward_cfg),
    ]


def small_kernels():
    combine = dict(max_ptr="*fp32", sum_exp_ptr="*fp32", sum_exp_z_ptr="*fp32", target_logit_ptr="*fp32",
                   logp_ptr="*fp32", lse_ptr="*fp32", entropy_ptr="*fp32", N="i32", num_splits="i32")
    seg = dict(logp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", group_ptr="*i32",
               num_bins_ptr="*i32", normaliser_ptr="*fp32", tokens_ptr="*fp32", bin_count_ptr="*fp32",
               bin_log_w_ptr="*fp32", bin_dloss_ptr="*fp32", grad_ptr="*fp32", row_sums_ptr="*fp32", B="i32",
               T="i32", beta="fp32", lo="fp32", hi="fp32", delta="fp32", log_ratio_limit="fp32")
    default = KernelConfig(1, 1, 1, num_warps=4, num_stages=1)  # launch settings of the launchers (Triton's)
    return [
        ("logprob_combine", logprob_forward._logprob_combine_kernel, combine,
         dict(WITH_ENTROPY=True, BLOCK_N=logprob_forward.COMBINE_BLOCK, BLOCK_S=64), False, default),
        ("segment_loss", segment_loss._segment_loss_kernel, seg,
         dict(HAS_OLD=True, HAS_REF=True, ADD_KL=True, HAS_DELTA=True, WEIGHTING=2, BLOCK_T=segment_loss.BLOCK_T,
              BLOCK_B=segment_loss.BLOCK_B), False, default),
    ]


def compile_one(name, kernel, signature, constexprs, matrix_units, cfg, arch, capability):
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(kernel, full, constexprs), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
                               capture_output=True, text=True, check=True).stderr
        usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    spill_stores, spill_loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                           ptxas).groups())
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    text = compiled.asm["ptx"]
    return dict(kernel=name, arch=arch, registers=int(fields["REG"]), shared=int(fields["SHARED"]),
                local=int(fields["LOCAL"]), stack=int(fields["STACK"]), spill_stores=spill_stores,
                spill_loads=spill_loads, dynamic_shared=compiled.metadata.shared, wgmma="wgmma" in text,
                mma="mma.sync" in text, needs_matrix_units=matrix_units)


def main():
    for arch, capability, key in (("sm_90a", 90, "sm_90"), ("sm_80", 80, "sm_80")):
        specs = [spec for dtype in TRITON_DTYPES for spec in head_kernels(key, dtype)] + small_kernels()
        for spec in specs:
            print(json.dumps(compile_one(*spec, arch, capability)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
