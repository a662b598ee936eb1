"""Instructions per code of the one-row kernel, without a GPU: compile `_stream_gemv_kernel` for a CUDA arch
(Triton can target one that is not here), disassemble it with the cuobjdump that Triton ships, and count the
instructions of its main loop against the codes one thread handles per step.

    python bench/kernel_sass.py                       # every width, every config of ops.STREAM_CONFIGS, sm_90
    python bench/kernel_sass.py --bits=4 --configs=128x4x4 --show   # one kernel, and its loop's instructions
    python bench/kernel_sass.py --kernel=gemm --bits=4                # the GEMM: are x and the words copied ahead?
    python bench/kernel_sass.py --bits=4 --norm=4096 --split=1         # the 6.7B up projection's fused variant

A config here is BLOCK_N x BLOCK_B x num_warps (the split, prefetch and x load of ops.STREAM_CONFIGS are set by
--split, --prefetch and --xload). The count is static (one pass of the loop body), a measure of work, not of time.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(message):
    sys.exit(f"kernel_sass.py: error: {message}")


def compile_stream(bits, block_n, block_b, warps, split, prefetch, arch, pdl=False, xload=0, norm=0, kp=1,
                   stats=False, act=0):
    """_stream_gemv_kernel compiled for `arch` as the launcher calls it; norm (1 LayerNorm, 2 RMSNorm) over kp
    values with stats (ops.norm_matmul), act (ops.ACTIVATIONS) for a fused layer's variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from quantization.kernels import ops, triton_kernels
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                 "stride_xm": "i32", "stride_ym": "i32", "blocks_per_group": "i32", "blocks_per_split": "i32"}
    # the pointers and sizes of the normalization and residual epilogues (ops.norm_matmul, ops.residual_matmul),
    # here unused
    signature.update({"r_ptr": "*bf16", "wg_ptr": "*fp32", "res_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*fp32",
                      "stride_rm": "i32", "stride_resm": "i32", "stride_um": "i32", "eps": "fp32",
                      "stamp_ptr": "*i64"})  # and the timeline's (bench/pdl_timeline.py), unused
    constants = dict(BITS=bits, HAS_ZERO=True, ZERO=0.0, HAS_BIAS=False, SPLIT=split, EVEN=True, BLOCK_N=block_n,
                     BLOCK_B=block_b, PREFETCH=prefetch, ACT=act, PDL=pdl, NORM=norm, KP=kp,
                     EARLY=kp <= ops.EARLY_ROW and not stats, RESID=False, EMIT_U=False, XLOAD=xload, STAMP=False, STATS=stats)
    signature.update({name: "constexpr" for name in constants})
    # pointers and N 16-aligned, as the launcher's arguments are in practice (vectorized word loads)
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)}
    source = ASTSource(fn=triton_kernels._stream_gemv_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))


# a decode-or-prefill call of the GEMM on a 4096 x 11008 layer: what the launcher specializes on
GEMM_SAMPLE = dict(M=256, N=11008, K=4096, stride_xm=4096, stride_ym=11008, blocks_per_group=4, blocks_per_split=128)


def compile_gemm(bits, block_m, block_n, block_k, warps, stages, unpack, arch, zwords=True):
    """_gemm_kernel as the launcher would compile it for GEMM_SAMPLE: 16-byte aligned pointers, and each integer
    argument the kernel specializes on marked divisible by 16 where the sample's value is."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from quantization.kernels import triton_kernels
    fn = triton_kernels._gemm_kernel
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", **{name: "i32" for name in GEMM_SAMPLE}}
    constants = dict(BITS=bits, HAS_ZERO=True, ZERO=0.0, HAS_BIAS=False, SPLIT=False, PRECISION="tf32",
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UNPACK=bool(unpack), ACT=0, PDL=False,
                     ZWORDS=zwords)
    signature.update({name: "constexpr" for name in constants})
    specialized = {p.name for p in fn.params if not p.do_not_specialize}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if signature[name].startswith("*") or (name in specialized and GEMM_SAMPLE.get(name, 1) % 16 == 0)}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def loads_before_wait(ptx):
    """Global loads a compiled kernel issues before it waits for the earlier kernels (griddepcontrol.wait, PDL), or
    None where it does not wait."""
    at = ptx.find("griddepcontrol.wait")
    return None if at < 0 else ptx[:at].count("ld.global")


def gemm_loads(ttgir):
    """(asynchronous copies to shared memory, synchronous loads of x tiles) in a compiled GEMM's TTGIR."""
    return (ttgir.count("async_copy_global_to_local"),
            len(re.findall(r"= tt\.load [^\n]*tensor<\d+x\d+x!tt\.ptr<bf16>", ttgir)))


def disassemble(cubin):
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        fail(f"no cuobjdump at {tool} (it ships with Triton's NVIDIA backend)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    registers = re.search(r"REG:(\d+)", usage)
    return code, int(registers.group(1)) if registers else None


def main_loop(code):
    """The largest loop: instructions from a backward branch's target to the branch."""
    loops = []
    for address, text in code:
        target = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loops.append([t for a, t in code if start <= a <= address])
    return max(loops, key=len) if loops else []


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="stream", choices=("stream", "gemm"),
                   help="the one-row kernel (instructions per code) or the GEMM (how x and the words are loaded)")
    p.add_argument("--bits", default="8,4,3,2,1", help="comma-separated code widths (ternary runs the 2-bit kernel)")
    p.add_argument("--configs", default="", help="comma-separated BLOCK_NxBLOCK_Bxwarps (default: those of "
                   "ops.STREAM_CONFIGS)")
    p.add_argument("--split", type=int, default=1, choices=(0, 1), help="compile the split-K epilogue (1) or not")
    p.add_argument("--prefetch", type=int, default=1, choices=(0, 1), help="compile the prefetch of the next step")
    p.add_argument("--xload", type=int, default=0, choices=(0, 1), help="how a step gets x (the kernel's XLOAD): "
                   "0 a load per value, 1 the step's block in one load")
    p.add_argument("--pdl", type=int, default=0, choices=(0, 1), help="compile the programmatic dependent launch "
                   "(1): the table then says how many global loads come before the wait for the earlier kernels")
    p.add_argument("--norm", type=int, default=0, help="compile the LayerNorm-fused variant over this many inputs "
                   "(ops.norm_matmul as the up projection runs it: statistics before the loop, the GELU); 0: the "
                   "plain kernel. The registers column then says how many of its programs fit a multiprocessor")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as a number (90: H100/H200)")
    p.add_argument("--show", action="store_true", help="also print the main loop's instructions")
    args = p.parse_args()
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        fail(f"--bits={args.bits!r}: expected comma-separated integers")
    if any(b not in (1, 2, 3, 4, 8) for b in bits):
        fail(f"--bits={args.bits!r}: the kernels take 1, 2, 3, 4 and 8")
    if args.norm < 0 or args.norm % 32:
        fail(f"--norm={args.norm}: expected 0 or a positive multiple of 32 (the row's length)")
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("needs Triton (pip install triton)")
    from quantization.kernels import ops
    if args.configs:
        try:
            configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        except ValueError:
            configs = [()]
        if any(len(c) != 3 for c in configs):
            fail(f"--configs={args.configs!r}: expected BLOCK_NxBLOCK_Bxwarps, e.g. 128x4x4")
    else:
        configs = sorted({(c[0], c[1], c[3]) for c in ops.STREAM_CONFIGS})
    if args.kernel == "gemm":
        gemm_table(bits, args.arch, args.show)
        return
    print("| bits | BLOCK_N x BLOCK_B x warps | loop instructions | codes per thread per step | per code | "
          "registers | most frequent |" + (" loads before the PDL wait |" if args.pdl else ""))
    print("|---:|---|---:|---:|---:|---:|---|" + ("---:|" if args.pdl else ""))
    for b in bits:
        for block_n, block_b, warps in configs:
            fused = dict(norm=1, kp=1 << (args.norm - 1).bit_length(), stats=True, act=1) if args.norm else {}
            kernel = compile_stream(b, block_n, block_b, warps, bool(args.split), bool(args.prefetch), args.arch,
                                    bool(args.pdl), args.xload, **fused)
            code, registers = disassemble(kernel.asm["cubin"])
            loop = main_loop(code)
            codes = block_n * block_b * 32 // (32 * warps)
            top = collections.Counter(opcode(t) for t in loop).most_common(5)
            print(f"| {b} | {block_n}x{block_b}x{warps} | {len(loop)} | {codes} | {len(loop) / codes:.2f} | "
                  f"{registers} | {', '.join(f'{k} {v}' for k, v in top)} |"
                  + (f" {loads_before_wait(kernel.asm['ptx'])} |" if args.pdl else ""), flush=True)
            if args.show:
                print("\n".join(loop))


def gemm_table(bits, arch, show):
    """Every config of ops.GEMM_CONFIGS and SMALL_GEMM_CONFIGS: how its tiles are loaded, its main loop's size."""
    from quantization.kernels import ops
    configs = sorted({(*c[:5], c[6] if len(c) > 6 else 0) for c in ops.SMALL_GEMM_CONFIGS + ops.GEMM_CONFIGS})
    print("| bits | BLOCK_M x BLOCK_N x BLOCK_K x warps x stages x unpack | asynchronous copies "
          "| x tiles loaded synchronously | loop instructions | registers | shared memory (KiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for b in bits:
        for config in configs:
            kernel = compile_gemm(b, *config, arch)
            copies, sync_x = gemm_loads(kernel.asm["ttgir"])
            code, registers = disassemble(kernel.asm["cubin"])
            loop = main_loop(code)
            print(f"| {b} | {'x'.join(map(str, config))} | {copies} | {sync_x} | {len(loop)} | {registers} "
                  f"| {kernel.metadata.shared / 1024:.0f} |", flush=True)
            if show:
                print("\n".join(loop))

if __name__ == "__main__":
    main()
