"""Products with weights held in their GGUF file's own bit widths (engine/cpu/file_blocks.py),
compiled at load with numba and llvmlite (wheels; no compiler).

A decode row is multiplied as llama.cpp multiplies it: the input row rounded to int8 a block of 32
(a float scale each), each chunk's integer dot product of its unsigned values with those int8s
(`vpdpbusd` through LLVM's intrinsic on a CPU with AVX-512 VNNI, plain IR elsewhere, which LLVM
lowers to `vpmaddwd`), times the chunk's scale and the input block's, less the chunk's min times
the input block's sum:

    y_r = Σ_c scale_c·xd_c·Σ_j q_j·xq_j − Σ_c min_c·xd_c·Σ_j xq_j

The loop over one row's chunks is LLVM IR written here (`_intrinsics`): numba's own loops widened
every integer to 64 bits and ran 3-4x slower. A row's scales, mins and input factors are taken as
vectors a K-quant super-block (or 4 chunks) at a time, and the products go into two accumulators.
Rows are split between `THREADS` threads (numba's `prange`, libgomp here). Up to FEW_ROWS input
rows (speculation's guesses, a batch's decode) read each weight row once for all of them. More
(a prefill pass) dequantize the product's weights to float32 (the same IR unpacking, in Python
threads) and multiply through the sgemm MLX's own float32 passes use. FEW_ROWS = 16 is a choice,
not a measured crossover.

The kernels compile at load (`compile_for`, ~1-2 s per block type and kind of pass; not cached
across processes); `available()` says whether numba and llvmlite import.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from engine.cpu.file_blocks import FileBlocks

THREADS = int(os.environ.get("OPENMLX_QUANT_THREADS", "2"))
FEW_ROWS = 16  # more rows than this: dequantized tiles and sgemm (see the module docstring)
_TILE_ROWS = 16384  # weight rows dequantized at a time for a many-row pass: every matrix of a 7B but its head at once
# (one switch between numba's threads and OpenBLAS's a product: each pool spins a while after its work, and
# 512-row tiles alternating the two ran a 256-row product ~3x slower here)

_lock = threading.Lock()  # one product at a time: numba's thread pool is shared by the process


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether numba and llvmlite import (and the kernels can be compiled)."""
    try:
        import llvmlite  # noqa: F401
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _numba() -> Any:
    import numba

    numba.set_num_threads(max(1, min(THREADS, numba.config.NUMBA_NUM_THREADS)))
    return numba


@dataclass(frozen=True)
class Layout:
    """What the row kernel reads of one block type (engine/cpu/file_blocks.py): value bits, chunk
    size, how a chunk's scale is stored (float16 bits, or a float32 a super-block of `per` chunks
    times an unsigned or signed byte a chunk), its mins (none, float16 bits a chunk, or two
    levels as the scale), and the whole zero."""

    bits: int
    chunk: int
    scale: str  # "f16" | "u8" | "i8"
    per: int
    mins: str  # "" | "f16" | "u8"
    zero: int


def layout(w: FileBlocks) -> Layout:
    scale = "f16" if w.half else ("i8" if w.sub.dtype == np.int8 else "u8")
    mins = "" if w.mins is None else ("u8" if w.min_sub is not None else "f16")
    return Layout(w.bits, w.chunk, scale, w.per, mins, w.zero)


@functools.lru_cache(maxsize=None)
def _intrinsics(spec: Layout) -> tuple[Any, Any]:
    """Two numba intrinsics for one layout, over the addresses of one weight row's arrays:
    float32 row(q, high, scale, sub, mins, min_sub, xq, xd, xsum, chunks), with one int8 input
    row's: Σ_c s_c·xd_c·Σ_j q_cj·xq_cj − Σ_c (s_c·zero + min_c)·xsum_c; and
    dequantize_row(q, high, scale, sub, mins, min_sub, out, chunks): the row as float32."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    bits, chunk = spec.bits, spec.chunk
    i1, i8, i16, i32, i64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
    f32 = ir.FloatType()
    vec = ir.VectorType
    qbytes = chunk if bits == 8 else chunk // 2
    shift = spec.per.bit_length() - 1  # c // per, per a power of two
    step = 32 // chunk  # chunks a step of the loop
    sbytes = 32 if bits == 8 else 16  # value bytes a step
    lanes = 8
    vnni = _vnni(lanes)

    def splat(builder: Any, value: Any, n: int) -> Any:
        v = builder.insert_element(ir.Constant(vec(value.type, n), None), value, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(vec(i32, n), [0] * n))

    def load(builder: Any, addr: Any, ty: Any, index: Any, align: int = 1) -> Any:
        p = builder.inttoptr(addr, ty.as_pointer())
        return builder.load(builder.gep(p, [index]), align=align)

    def half(builder: Any, bits16: Any) -> Any:
        return builder.fpext(builder.bitcast(bits16, ir.HalfType()), f32)

    def small(builder: Any, addr: Any, index: Any, signed: bool) -> Any:
        byte = load(builder, addr, i8, index)
        return builder.sitofp(byte, f32) if signed else builder.uitofp(byte, f32)

    def values(builder: Any, qa: Any, ha: Any, c: Any) -> Any:
        """The unsigned values of the step at chunk c: <32 x i8> (one chunk of 32 or two of 16)."""
        n = ir.IntType(64)
        p = builder.inttoptr(builder.add(qa, builder.mul(c, ir.Constant(n, qbytes))), vec(i8, sbytes).as_pointer())
        raw = builder.load(p, align=1)
        if bits == 8:
            return raw
        lo = builder.and_(raw, ir.Constant(vec(i8, sbytes), [15] * sbytes))
        hi = builder.lshr(raw, ir.Constant(vec(i8, sbytes), [4] * sbytes))
        interleave = [v for j in range(sbytes) for v in (j, j + sbytes)]
        q = builder.shuffle_vector(lo, hi, ir.Constant(vec(i32, 32), interleave))
        if bits == 5:
            plane = builder.zext(builder.bitcast(load(builder, ha, i32, c, 4), vec(i1, 32)), vec(i8, 32))
            q = builder.or_(q, builder.shl(plane, ir.Constant(vec(i8, 32), [4] * 32)))
        elif bits == 6:  # two chunks' words: bits 0-15 a chunk's fifth bits, 16-31 its sixth
            words = builder.load(builder.gep(builder.inttoptr(ha, i64.as_pointer()),
                                             [builder.lshr(c, ir.Constant(n, 1))]), align=4)
            plane = builder.zext(builder.bitcast(words, vec(i1, 64)), vec(i8, 64))
            b4 = builder.shuffle_vector(plane, plane, ir.Constant(vec(i32, 32), list(range(16)) + list(range(32, 48))))
            b5 = builder.shuffle_vector(plane, plane, ir.Constant(vec(i32, 32), list(range(16, 32)) + list(range(48, 64))))
            q = builder.or_(q, builder.or_(builder.shl(b4, ir.Constant(vec(i8, 32), [4] * 32)),
                                           builder.shl(b5, ir.Constant(vec(i8, 32), [5] * 32))))
        return q

    def scale_min(builder: Any, sa: Any, suba: Any, ma: Any, msuba: Any, cc: Any) -> tuple[Any, Any]:
        """Chunk cc's scale s and its min m (the whole zero folded in): w = s·q − m."""
        n = ir.IntType(64)
        if spec.scale == "f16":
            s = half(builder, load(builder, sa, i16, cc, 2))
        else:
            sup = load(builder, sa, f32, builder.lshr(cc, ir.Constant(n, shift)), 4)
            s = builder.fmul(sup, small(builder, suba, cc, spec.scale == "i8"))
        m = builder.fmul(s, ir.Constant(f32, float(spec.zero)))
        if spec.mins == "f16":
            m = builder.fadd(m, half(builder, load(builder, ma, i16, cc, 2)))
        elif spec.mins == "u8":
            msup = load(builder, ma, f32, builder.lshr(cc, ir.Constant(n, shift)), 4)
            m = builder.fadd(m, builder.fmul(msup, small(builder, msuba, cc, False)))
        return s, m

    def by_chunk(builder: Any, first: Any, second: Any, width: int) -> Any:
        """A vector of `width` lanes: the first half `first`, the second `second` (a step's two
        16-value chunks), or all `first` where a step is one chunk."""
        a = splat(builder, first, width)
        if second is None:
            return a
        b = splat(builder, second, width)
        return builder.shuffle_vector(a, b, ir.Constant(vec(i32, width),
                                                        list(range(width // 2)) + list(range(width + width // 2, 2 * width))))

    @intrinsic
    def row(typingctx: Any, q_addr: Any, high_addr: Any, scale_addr: Any, sub_addr: Any, mins_addr: Any,
            min_sub_addr: Any, x_addr: Any, xd_addr: Any, xsum_addr: Any, chunks: Any) -> Any:
        sig = types.float32(*([types.uintp] * 9), types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            qa, ha, sa, suba, ma, msuba, xa, xda, xsa, n = args
            const = functools.partial(ir.Constant, n.type)

            def dot(c: Any) -> Any:
                """The step at chunk c's integer products, 8 lanes of 4 values each."""
                q = values(builder, qa, ha, c)
                px = builder.inttoptr(builder.add(xa, builder.mul(c, ir.Constant(n.type, chunk))), vec(i8, 32).as_pointer())
                x = builder.load(px, align=1)
                if vnni:  # lane l: the sum of values 4l..4l+3's products, unsigned x signed bytes
                    fn = builder.module.globals.get(vnni) or ir.Function(
                        builder.module, ir.FunctionType(vec(i32, 8), [vec(i32, 8)] * 3), name=vnni)
                    prod = builder.call(fn, [ir.Constant(vec(i32, 8), [0] * 8), builder.bitcast(q, vec(i32, 8)),
                                             builder.bitcast(x, vec(i32, 8))])
                else:  # the same lanes in plain IR
                    wide = builder.mul(builder.zext(q, vec(i32, 32)), builder.sext(x, vec(i32, 32)))
                    prod = None
                    for t in range(4):
                        part = builder.shuffle_vector(wide, wide, ir.Constant(vec(i32, 8), list(range(t, 32, 4))))
                        prod = part if prod is None else builder.add(prod, part)
                return prod

            def step_at(c: Any, acc: Any, low: Any) -> tuple[Any, Any]:
                prod = dot(c)
                # each chunk's scale and min, scalar beside the vector work
                factors, new_low = [], low
                for sub_chunk in range(step):
                    cc = builder.add(c, ir.Constant(n.type, sub_chunk)) if sub_chunk else c
                    s, m = scale_min(builder, sa, suba, ma, msuba, cc)
                    new_low = builder.fadd(new_low, builder.fmul(m, load(builder, xsa, f32, cc, 4)))
                    factors.append(builder.fmul(s, load(builder, xda, f32, cc, 4)))
                scale = by_chunk(builder, factors[0], factors[1] if step == 2 else None, 8)  # lanes 0-3, 4-7
                new = builder.fadd(acc, builder.fmul(builder.sitofp(prod, vec(f32, 8)), scale))
                return new, new_low

            def super_blocks(dot: Callable[[Any], Any], per: int) -> Any:
                """A row `per` chunks a turn (a K-quant's super-block, 256 values; or 4 chunks of a
                one-level format): their scales, mins and input factors as vectors once, then each
                step's products scaled by a lane of them; no scalar work a chunk (Q6_K's down
                projections of the 0.5B 0.19-0.28 -> 0.12 ms, Q4_K's 0.12 -> 0.08, measured)."""
                pv = vec(f32, per)
                entry = builder.block
                loop, done = builder.append_basic_block("supers"), builder.append_basic_block("done")
                supers = builder.udiv(n, const(per))
                zero8 = ir.Constant(vec(f32, 8), [0.0] * 8)
                zerop = ir.Constant(pv, [0.0] * per)
                builder.cbranch(builder.icmp_signed(">", supers, const(0)), loop, done)
                builder.position_at_end(loop)
                b, acc0, acc1, low = (builder.phi(t) for t in (n.type, zero8.type, zero8.type, pv))
                for phi, start in ((b, const(0)), (acc0, zero8), (acc1, zero8), (low, zerop)):
                    phi.add_incoming(start, entry)
                first = builder.mul(b, const(per))

                def row_vec(addr: Any, ty: Any, size: int) -> Any:
                    p = builder.inttoptr(builder.add(addr, builder.mul(first, const(size))), vec(ty, per).as_pointer())
                    return builder.load(p, align=1)

                if spec.scale == "f16":
                    svec = builder.fpext(builder.bitcast(row_vec(sa, i16, 2), vec(ir.HalfType(), per)), pv)
                else:
                    sub = row_vec(suba, i8, 1)
                    sub = builder.sitofp(sub, pv) if spec.scale == "i8" else builder.uitofp(sub, pv)
                    svec = builder.fmul(splat(builder, load(builder, sa, f32, b, 4), per), sub)
                mvec = builder.fmul(svec, ir.Constant(pv, [float(spec.zero)] * per))
                if spec.mins == "f16":
                    mvec = builder.fadd(mvec, builder.fpext(builder.bitcast(row_vec(ma, i16, 2), vec(ir.HalfType(), per)), pv))
                elif spec.mins == "u8":
                    msub = builder.uitofp(row_vec(msuba, i8, 1), pv)
                    mvec = builder.fadd(mvec, builder.fmul(splat(builder, load(builder, ma, f32, b, 4), per), msub))
                new_low = builder.fadd(low, builder.fmul(mvec, row_vec(xsa, f32, 4)))
                sx = builder.fmul(svec, row_vec(xda, f32, 4))
                accs = [acc0, acc1]
                for t in range(per // step):
                    prod = dot(builder.add(first, const(t * step)))
                    lanes = [t] * 8 if step == 1 else [2 * t] * 4 + [2 * t + 1] * 4
                    scale = builder.shuffle_vector(sx, sx, ir.Constant(vec(i32, 8), lanes))
                    accs[t % 2] = builder.fadd(accs[t % 2], builder.fmul(builder.sitofp(prod, vec(f32, 8)), scale))
                following = builder.add(b, const(1))
                loop_end = builder.block
                for phi, value in ((b, following), (acc0, accs[0]), (acc1, accs[1]), (low, new_low)):
                    phi.add_incoming(value, loop_end)
                builder.cbranch(builder.icmp_signed("<", following, supers), loop, done)
                builder.position_at_end(done)
                ends = []
                for start, value in ((zero8, accs[0]), (zero8, accs[1]), (zerop, new_low)):
                    phi = builder.phi(value.type)
                    phi.add_incoming(start, entry)
                    phi.add_incoming(value, loop_end)
                    ends.append(phi)
                return builder.fsub(horizontal(builder.fadd(ends[0], ends[1]), 8), horizontal(ends[2], per))

            def horizontal(v: Any, width: int) -> Any:
                while width > 1:
                    width //= 2
                    left = builder.shuffle_vector(v, v, ir.Constant(vec(i32, width), list(range(width))))
                    right = builder.shuffle_vector(v, v, ir.Constant(vec(i32, width), list(range(width, 2 * width))))
                    v = builder.fadd(left, right)
                return builder.extract_element(v, ir.Constant(i32, 0))

            if spec.per > 1:
                return super_blocks(dot, spec.per)
            def scalar_steps() -> Any:
                # two steps a turn into two accumulators (a float add's latency, not the work, bound one
                # chain: 4 cycles a step), then the odd step left, if any
                entry = builder.block
                pairs, after = builder.append_basic_block("pairs"), builder.append_basic_block("after")
                tail, done = builder.append_basic_block("tail"), builder.append_basic_block("done")
                zero = ir.Constant(vec(f32, 8), [0.0] * 8)
                nil = ir.Constant(f32, 0.0)
                even = builder.sub(n, builder.srem(n, const(2 * step)))
                builder.cbranch(builder.icmp_signed(">", even, const(0)), pairs, after)
                builder.position_at_end(pairs)
                c, acc0, acc1, low0, low1 = (builder.phi(t) for t in (n.type, zero.type, zero.type, f32, f32))
                for phi, start in ((c, const(0)), (acc0, zero), (acc1, zero), (low0, nil), (low1, nil)):
                    phi.add_incoming(start, entry)
                new0, lnew0 = step_at(c, acc0, low0)
                new1, lnew1 = step_at(builder.add(c, const(step)), acc1, low1)
                following = builder.add(c, const(2 * step))
                for phi, value in ((c, following), (acc0, new0), (acc1, new1), (low0, lnew0), (low1, lnew1)):
                    phi.add_incoming(value, builder.block)
                builder.cbranch(builder.icmp_signed("<", following, even), pairs, after)
                builder.position_at_end(after)
                merged = []
                for value, start in ((following, const(0)), (new0, zero), (new1, zero), (lnew0, nil), (lnew1, nil)):
                    phi = builder.phi(value.type)
                    phi.add_incoming(start, entry)
                    phi.add_incoming(value, pairs)
                    merged.append(phi)
                at, acc0, acc1, low0, low1 = merged
                builder.cbranch(builder.icmp_signed("<", at, n), tail, done)
                builder.position_at_end(tail)
                last, last_low = step_at(at, acc0, low0)
                builder.branch(done)
                builder.position_at_end(done)
                total, lows = builder.phi(zero.type), builder.phi(f32)
                total.add_incoming(acc0, after)
                total.add_incoming(last, tail)
                lows.add_incoming(low0, after)
                lows.add_incoming(last_low, tail)
                v = builder.fadd(total, acc1)
                width = 8
                while width > 1:
                    width //= 2
                    left = builder.shuffle_vector(v, v, ir.Constant(vec(i32, width), list(range(width))))
                    right = builder.shuffle_vector(v, v, ir.Constant(vec(i32, width), list(range(width, 2 * width))))
                    v = builder.fadd(left, right)
                return builder.fsub(builder.extract_element(v, ir.Constant(i32, 0)), builder.fadd(lows, low1))
            # one-level formats: 4 chunks a turn where the row has whole fours (every width a
            # model has: k a multiple of 128), else a step at a time with scalar scales
            fours, steps, result = (builder.append_basic_block(x) for x in ("fours", "steps", "result"))
            builder.cbranch(builder.icmp_signed("==", builder.srem(n, const(4)), const(0)), fours, steps)
            builder.position_at_end(fours)
            grouped = super_blocks(dot, 4)
            grouped_end = builder.block
            builder.branch(result)
            builder.position_at_end(steps)
            stepped = scalar_steps()
            stepped_end = builder.block
            builder.branch(result)
            builder.position_at_end(result)
            value = builder.phi(f32)
            value.add_incoming(grouped, grouped_end)
            value.add_incoming(stepped, stepped_end)
            return value
        return sig, codegen

    @intrinsic
    def dequantize_row(typingctx: Any, q_addr: Any, high_addr: Any, scale_addr: Any, sub_addr: Any,
                       mins_addr: Any, min_sub_addr: Any, out_addr: Any, chunks: Any) -> Any:
        """One weight row as float32 at out_addr: s·q − m, 32 values a step."""
        sig = types.void(*([types.uintp] * 7), types.intp)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            qa, ha, sa, suba, ma, msuba, oa, n = args
            entry = builder.block
            loop, done = builder.append_basic_block("steps"), builder.append_basic_block("done")
            builder.cbranch(builder.icmp_signed(">", n, ir.Constant(n.type, 0)), loop, done)
            builder.position_at_end(loop)
            c = builder.phi(n.type)
            c.add_incoming(ir.Constant(n.type, 0), entry)
            q = builder.uitofp(values(builder, qa, ha, c), vec(f32, 32))
            pairs = [scale_min(builder, sa, suba, ma, msuba, c)]
            if step == 2:
                pairs.append(scale_min(builder, sa, suba, ma, msuba, builder.add(c, ir.Constant(n.type, 1))))
            second = pairs[1] if step == 2 else (None, None)
            w = builder.fsub(builder.fmul(q, by_chunk(builder, pairs[0][0], second[0], 32)),
                             by_chunk(builder, pairs[0][1], second[1], 32))
            target = builder.inttoptr(builder.add(oa, builder.mul(c, ir.Constant(n.type, chunk * 4))),
                                      vec(f32, 32).as_pointer())
            builder.store(w, target, align=4)
            following = builder.add(c, ir.Constant(n.type, step))
            c.add_incoming(following, builder.block)
            builder.cbranch(builder.icmp_signed("<", following, n), loop, done)
            builder.position_at_end(done)
            return context.get_dummy_value()
        return sig, codegen
    return row, dequantize_row


@functools.lru_cache(maxsize=None)
def _rows_kernel(spec: Layout) -> Callable[..., Any]:
    """y (m, n) = x (m rows, int8 blocks) · Wᵀ for one block layout, weight rows split across threads."""
    nb = _numba()
    row = _intrinsics(spec)[0]
    chunk = spec.chunk

    @nb.njit(parallel=True, boundscheck=False, nogil=True)
    def product(q, high, scale, sub, mins, min_sub, xq, xd, xsum, out):
        n, chunks = q.shape[0], xq.shape[1] // chunk
        m_rows = xq.shape[0]
        tiles = (n + 31) // 32
        for t in nb.prange(tiles):
            for r in range(t * 32, min(n, t * 32 + 32)):
                for i in range(m_rows):
                    out[i, r] = row(q.ctypes.data + r * q.strides[0], high.ctypes.data + r * high.strides[0],
                                    scale.ctypes.data + r * scale.strides[0], sub.ctypes.data + r * sub.strides[0],
                                    mins.ctypes.data + r * mins.strides[0],
                                    min_sub.ctypes.data + r * min_sub.strides[0],
                                    xq.ctypes.data + i * xq.strides[0], xd.ctypes.data + i * xd.strides[0],
                                    xsum.ctypes.data + i * xsum.strides[0], chunks)
    return product


@functools.lru_cache(maxsize=None)
def _dequantize_kernel(spec: Layout) -> Callable[..., Any]:
    """Rows [start, start + out rows) of W as float32 into `out`, on the calling thread (the GIL
    released: `dequantize_rows` runs one a thread)."""
    nb = _numba()
    dequantize_row = _intrinsics(spec)[1]
    chunk = spec.chunk

    @nb.njit(boundscheck=False, nogil=True)
    def dequantize(q, high, scale, sub, mins, min_sub, start, out):
        rows, chunks = out.shape[0], out.shape[1] // chunk
        for i in range(rows):
            r = start + i
            dequantize_row(q.ctypes.data + r * q.strides[0], high.ctypes.data + r * high.strides[0],
                           scale.ctypes.data + r * scale.strides[0], sub.ctypes.data + r * sub.strides[0],
                           mins.ctypes.data + r * mins.strides[0], min_sub.ctypes.data + r * min_sub.strides[0],
                           out.ctypes.data + i * out.strides[0], chunks)
    return dequantize


def _vnni(lanes: int) -> str:
    """LLVM's VNNI intrinsic for `lanes` int32 lanes where this CPU has AVX-512 VNNI (with VL),
    else "" (plain IR: LLVM picks vpmaddwd). Measured here: a 0.5B's products a step 31 -> 21 ms."""
    if os.environ.get("OPENMLX_VNNI") == "off":
        return ""
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no feature list: the plain IR is correct everywhere
        return ""
    if features.get("avx512vnni") and features.get("avx512vl"):
        return f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    return ""


@functools.lru_cache(maxsize=None)
def _half() -> Any:
    """A numba intrinsic: a float16's bits (uint16) as float32."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def half(typingctx: Any, bits: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen
    return half


@functools.lru_cache(maxsize=None)
def _quantize_kernel() -> Callable[..., Any]:
    """Input rows (m, k) float32 -> int8 blocks of 32 (llama.cpp's Q8_0 rounding), and for chunks
    of `chunk` values each chunk's input scale and its scaled sum."""
    nb = _numba()

    @nb.njit(boundscheck=False, nogil=True)
    def quantize(x, chunk, xq, xd, xsum):
        m, k = x.shape
        for i in range(m):
            for b in range(k // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    amax = max(amax, abs(x[i, b * 32 + j]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                for j in range(32):
                    xq[i, b * 32 + j] = np.int8(np.rint(x[i, b * 32 + j] * inv))
                for part in range(32 // chunk):
                    c = b * (32 // chunk) + part
                    total = 0
                    for j in range(chunk):
                        total += xq[i, c * chunk + j]
                    xd[i, c] = d
                    xsum[i, c] = d * np.float32(total)
    return quantize


_PLACEHOLDER = np.zeros((1, 1), np.uint8)


def _fields(w: FileBlocks) -> tuple[np.ndarray, ...]:
    """The kernels' weight arguments, as byte-typed 2-D arrays (one signature for every layout;
    a field the layout lacks is a 1x1 placeholder the kernel never reads)."""
    def as_bytes(a: Any) -> np.ndarray:
        return _PLACEHOLDER if a is None else a.reshape(a.shape[0], -1).view(np.uint8)
    return (w.q.reshape(w.q.shape[0], -1), as_bytes(w.high), as_bytes(w.scale), as_bytes(w.sub),
            as_bytes(w.mins), as_bytes(w.min_sub))


class Product:
    """x Wᵀ for one matrix, its kernels and their arguments looked up once (a decode step makes
    ~100 of these calls; the lookups cost ~10 µs each)."""

    def __init__(self, w: FileBlocks) -> None:
        self.w, self.layout, self.fields = w, layout(w), _fields(w)
        self._rows: Optional[Callable[..., Any]] = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (m, k) float32 -> (m, n) float32."""
        x = np.ascontiguousarray(x, np.float32)
        m, k = x.shape
        if m > FEW_ROWS:
            return _many_rows(self.w, x)
        if self._rows is None:
            self._rows = _rows_kernel(self.layout)
        chunks = k // self.layout.chunk
        xq = np.empty((m, k), np.int8)
        xd = np.empty((m, chunks), np.float32)
        xsum = np.empty((m, chunks), np.float32)
        out = np.empty((m, self.w.shape[0]), np.float32)
        with _lock:
            _quantize_kernel()(x, self.layout.chunk, xq, xd, xsum)
            self._rows(*self.fields, xq, xd, xsum, out)
        return out


def product(w: FileBlocks, x: np.ndarray) -> np.ndarray:
    """x (m, k) float32 -> x Wᵀ (m, n) float32."""
    return Product(w)(x)


def compile_for(matrices: list[FileBlocks]) -> int:
    """Compile the kernels these matrices' layouts need (a few seconds each, at load rather than
    in a first request) by running each once on two of its rows. Returns the layouts compiled."""
    done: set[Layout] = set()
    for w in matrices:
        if layout(w) in done:
            continue
        done.add(layout(w))
        rows = w.rows(slice(0, 2))
        for m in (1, FEW_ROWS + 1):  # the row kernel and the dequantizing one
            product(rows, np.zeros((m, w.shape[1]), np.float32))
    return len(done)


def dequantize_rows(w: FileBlocks, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of W as float32, split between `THREADS` Python threads. Not numba's
    pool: libgomp's threads spin ~300k rounds after their work, and OpenBLAS's sgemm that follows
    then ran on one core (a 256-row product 16 -> 24 ms here); with fewer rounds (GOMP_SPINCOUNT)
    a decode step's products found the pool asleep instead (0.5B decode 37 -> 29 tok/s)."""
    out = np.empty((stop - start, w.shape[1]), np.float32)
    kernel, fields = _dequantize_kernel(layout(w)), _fields(w)
    parts = np.linspace(0, stop - start, THREADS + 1).astype(int)
    jobs = [(int(a), int(b)) for a, b in zip(parts[:-1], parts[1:]) if b > a]
    if len(jobs) == 1:
        kernel(*fields, start, out)
        return out
    list(_pool().map(lambda job: kernel(*fields, start + job[0], out[job[0]:job[1]]), jobs))
    return out


@functools.lru_cache(maxsize=1)
def _pool() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(THREADS, thread_name_prefix="openmlx-dequantize")


def _many_rows(w: FileBlocks, x: np.ndarray) -> np.ndarray:
    """x Wᵀ, W dequantized `_TILE_ROWS` rows at a time, each tile's product by the sgemm MLX's
    own float32 passes use (its OpenBLAS through cblas: numpy's bundled one ran ~2x slower here)."""
    from engine.cpu import blas

    n = w.shape[0]
    out = np.empty((x.shape[0], n), np.float32)
    gemm = blas.products().gemm
    for at in range(0, n, _TILE_ROWS):
        stop = min(n, at + _TILE_ROWS)
        gemm(x, dequantize_rows(w, at, stop), out[:, at:stop], transpose_b=True)
    return out
