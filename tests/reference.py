"""A slow, independent restatement of SPEC §2–§5 in numpy + ml_dtypes, written from the SPEC text (block by block,
with ml_dtypes doing every FP4/FP8 rounding). The fast torch implementation is tested against it."""

import ml_dtypes as md
import numpy as np

f32 = np.float32


def e2m1(v):
    """fp32 -> (E2M1 code, value) via ml_dtypes, after clamping to ±6."""
    q = np.clip(np.asarray(v, f32), -6, 6).astype(md.float4_e2m1fn)
    return q.view(np.uint8) & 0xF, q.astype(f32)


def ue4m3(s):
    q = np.clip(np.asarray(s, f32), f32(2**-9), f32(448)).astype(md.float8_e4m3fn)
    return q.view(np.uint8), q.astype(f32)


def blocks(x, b):
    m, k = x.shape
    pad = -k % b
    return np.pad(x, ((0, 0), (0, pad))).reshape(m, -1, b)


def nvfp4_blocks(x, b=16):
    """Codes [M, Kp], scale codes [M, nb], dequantized [M, K] of an already tensor-scaled x."""
    m, k = x.shape
    codes, scodes, deq = [], [], []
    for row in blocks(np.asarray(x, f32), b):
        for v in row:
            sc, s = ue4m3(f32(np.abs(v).max()) / f32(6))
            qc, qv = e2m1(v * (f32(1) / s))
            codes.append(qc), scodes.append(sc), deq.append(qv * s)
    return (np.array(codes).reshape(m, -1), np.array(scodes).reshape(m, -1),
            np.array(deq, f32).reshape(m, -1)[:, :k])


def mxfp4_blocks(x, b=32):
    m, k = x.shape
    codes, scodes, deq = [], [], []
    for row in blocks(np.asarray(x, f32), b):
        for v in row:
            amax = np.abs(v).max()
            e = (np.frexp(amax)[1] - 1 - 2) if amax > 0 else -127
            e = int(np.clip(e, -127, 127))
            s = np.ldexp(f32(1), e).astype(f32)
            assert np.array([e + 127], np.uint8).view(md.float8_e8m0fnu).astype(f32)[0] == s
            qc, qv = e2m1(v * (f32(1) / s))
            codes.append(qc), scodes.append(e + 127), deq.append(qv * s)
    return (np.array(codes).reshape(m, -1), np.array(scodes, np.uint8).reshape(m, -1),
            np.array(deq, f32).reshape(m, -1)[:, :k])


def e6m2(v):
    """RNE to 2 mantissa bits, exponent in [-48, 15], the NaN code (0xFF) avoided: the value."""
    if v <= 2.0**-48:
        return f32(2.0**-48)
    e = int(np.floor(np.log2(v)))
    while 2.0**e > v:
        e -= 1
    while 2.0 ** (e + 1) <= v:
        e += 1
    mant = v / 2.0**e * 4  # in [4, 8)
    r = np.round(mant)  # numpy: half to even
    if r == 8:
        r, e = 4, e + 1
    return f32(min(r / 4 * 2.0**e, 2.0**15 * 1.5))  # 1.75 * 2^15 would be the NaN code: saturate below it


def hif4_blocks(x):
    m, k = x.shape
    deq = []
    for row in blocks(np.asarray(x, f32), 64):
        for v in row:
            v16 = np.abs(v).reshape(16, 4).max(1)
            v8 = v16.reshape(8, 2).max(1)
            s = e6m2(f32(v8.max()) / f32(7))
            out = np.empty(64, f32)
            for j in range(16):
                e8 = int(v8[j // 2] / s >= 4)
                e16 = int(v16[j] / s / f32(2**e8) >= 2)
                y = v[4 * j: 4 * j + 4] / s / f32(2 ** (e8 + e16))
                q = np.round(np.clip(np.abs(y), 0, 1.75) * 4) / 4 * np.sign(y)
                out[4 * j: 4 * j + 4] = q * s * 2 ** (e8 + e16)
            deq.append(out)
    return np.array(deq, f32).reshape(m, -1)[:, :k]


def n_of_m(x, n, m, group):
    """Keep the n best of m units (score: max |x| of the unit); ties to the lower index. Returns a bool mask."""
    rows, k = x.shape
    chunk = m * group
    xp = np.pad(np.abs(np.asarray(x, f32)), ((0, 0), (0, -k % chunk)))
    mask = np.zeros_like(xp, bool)
    for r in range(rows):
        for c in range(0, xp.shape[1], chunk):
            score = xp[r, c: c + chunk].reshape(m, group).max(1)
            best = sorted(range(m), key=lambda i: (-score[i], i))[:n]
            for i in best:
                mask[r, c + i * group: c + (i + 1) * group] = True
    return mask[:, :k]


def tensor_scale(x):
    return max(f32(np.abs(x).max()) / f32(2688), f32(1e-9))


def sharq_operands(x):
    """SPEC §5 activation side: (Xs, mask, sparse codes/scales, deq S, R, residual codes/scales, deq R, s_x)."""
    x = np.asarray(x, f32)
    s_x = f32(tensor_scale(x))
    xs = (x / s_x).astype(md.bfloat16).astype(f32)
    mask = n_of_m(xs, 2, 4, 2)
    s = np.where(mask, xs, f32(0))
    sc, ss, sd = nvfp4_blocks(s, 32)
    r = xs - sd
    rc, rs, rd = nvfp4_blocks(r, 16)
    return dict(xs=xs, mask=mask, s_codes=sc, s_scales=ss, s_deq=sd, r=r, r_codes=rc, r_scales=rs, r_deq=rd,
                s_x=s_x)
