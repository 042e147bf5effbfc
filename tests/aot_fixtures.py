"""Known-good and known-bad kernel specs that prove kernels/aot.py catches what it should.

Used by tests/test_aot.py through ``python -m kernels.aot --module aot_fixtures``.
"""
import triton
import triton.language as tl


@triton.jit
def _row_scale_kernel(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # Every loaded value stays live until the row sums are known: with one warp and a big
    # tile this needs far more than 255 registers per thread, so ptxas must spill.
    r = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + r)
    tl.store(out_ptr + r, x * tl.sum(x, axis=1)[:, None])


@triton.jit
def _matmul_tile_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        STEPS: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(STEPS):
        a = tl.load(a_ptr + rm[:, None] * (BK * STEPS) + s * BK + rk[None, :])
        b = tl.load(b_ptr + (s * BK + rk[:, None]) * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


_MATMUL_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
_ALIGNED = ["a_ptr", "b_ptr", "c_ptr"]


def aot_specs():
    return [
        dict(name="fixture small-tile (good)", kernel=_row_scale_kernel,
             signature={"x_ptr": "*fp32", "out_ptr": "*fp32"}, constexprs={"ROWS": 4, "COLS": 128},
             num_warps=4, div16=["x_ptr", "out_ptr"]),
        dict(name="fixture huge-tile (spills)", kernel=_row_scale_kernel,
             signature={"x_ptr": "*fp32", "out_ptr": "*fp32"}, constexprs={"ROWS": 64, "COLS": 256},
             num_warps=1, div16=["x_ptr", "out_ptr"]),
        dict(name="fixture matmul (mma)", kernel=_matmul_tile_kernel, signature=_MATMUL_SIG,
             constexprs={"BM": 64, "BN": 64, "BK": 32, "STEPS": 4}, num_warps=4, num_stages=2,
             div16=_ALIGNED, uses_mma=True),
        dict(name="fixture no-dot claims mma", kernel=_row_scale_kernel,
             signature={"x_ptr": "*fp32", "out_ptr": "*fp32"}, constexprs={"ROWS": 4, "COLS": 128},
             num_warps=4, div16=["x_ptr", "out_ptr"], uses_mma=True),
        dict(name="fixture matmul (smem overflow)", kernel=_matmul_tile_kernel, signature=_MATMUL_SIG,
             constexprs={"BM": 128, "BN": 128, "BK": 128, "STEPS": 8}, num_warps=4, num_stages=6,
             div16=_ALIGNED, uses_mma=True),
    ]
