"""Compiles the FAVOR+ Triton kernels for an H100 (sm_90) without a GPU and reports what each needs:
shared memory per block, and registers and spill stack per thread (from the cubin, when Triton's
cuobjdump is there). Nothing runs: the kernels are compiled exactly as a launch would compile them
(the tile sizes, warps and pipeline stages of performer/ops/favor/triton.py), for the head sizes
given, at m = 256 features.

    python scripts/triton_sm90.py [--dims 64 128 256] [--dtypes bf16 fp32] [--json FILE]

Needs triton with its NVIDIA backend (the pip wheel has ptxas). On a CPU build of torch the package
defines its Triton kernels only where they could run, so this script declares a CUDA build before
importing it (this process only; nothing is launched).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

if torch.version.cuda is None:
    torch.version.cuda = "13.0"   # see the docstring: defines the kernels, launches nothing

import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from performer.ops.favor import triton as ft  # noqa: E402

KERNELS = ("_bidir_state_kernel", "_bidir_out_kernel", "_bidir_dq_kernel", "_bidir_dstate_kernel",
           "_bidir_dkv_kernel", "_causal_fwd_kernel", "_causal_dq_kernel", "_causal_dkv_kernel")
TENSOR_ARGS = ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "out_ptr")
H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype if name in TENSOR_ARGS else "*i8" if name == "mask_ptr" else "*fp32"
        else:
            sig[name] = "fp32" if name == "half_c2" else "i32"
    return sig


def _cubin_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for field in text.split():
        key, _, value = field.partition(":")
        if key in ("REG", "STACK") and value.isdigit():
            usage[key.lower()] = int(value)
    return usage


def compile_kernel(name: str, dtype: str, E: int, m: int = 256) -> dict:
    """What `name` needs at head size E = Ev and m features, compiled as _Launch would launch it."""
    q = torch.empty(1, 1, 1, E, dtype=TORCH_DTYPES[dtype])
    launch = ft._Launch(q, q, q, torch.empty(m, E), None, None, 1.0, "causal" in name, "softmax")
    fn = getattr(ft, name)
    constexprs = {k: v for k, v in {**launch.meta, "HAS_MASK": False, "FEAT_GRAD": False}.items()
                  if k in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch.launch["num_warps"],
                                       "num_stages": launch.launch["num_stages"]})
    return {"kernel": name, "dtype": dtype, "E": E, "m": m, "M_BLOCK": launch.m_block,
            "num_warps": launch.launch["num_warps"], "shared": compiled.metadata.shared,
            **_cubin_usage(compiled.asm["cubin"])}


def main(argv=None) -> int:
    if ft.INTERPRET:
        sys.exit("triton_sm90.py compiles kernels: run it without TRITON_INTERPRET=1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(TORCH_DTYPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [compile_kernel(k, dt, E) for dt in args.dtypes for E in args.dims for k in args.kernels]
    print("| kernel | dtype | E = Ev | M_BLOCK | warps | shared KiB | registers | spill stack B |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['E']} | {r['M_BLOCK']} | {r['num_warps']} | "
              f"{r['shared'] / 1024:.0f} | {r.get('reg', '?')} | {r.get('stack', '?')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["shared"] <= H100_SHARED for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
