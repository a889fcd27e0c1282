"""The LLVM IR of the compiled kernels over a GGUF file's own blocks (engine/cpu/block_kernels.py):
for one block layout, two numba intrinsics looping over a weight row's chunks, one multiplying it
with an int8 input row, one writing it out as float32. Written as IR because numba's own loops
widened every integer to 64 bits (3-4x slower here) and can't name `vpdpbusd`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from engine.cpu.file_blocks import FileBlocks


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
def intrinsics(spec: Layout) -> tuple[Any, Any]:
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
    vnni = vnni_name(lanes)

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


def vnni_name(lanes: int) -> str:
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
