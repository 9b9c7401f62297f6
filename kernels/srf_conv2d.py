"""Triton kernels of ``dcn_fast::srf_conv2d`` (groups = 1), layered
kernel → host function → the op's ``triton`` algorithm (``dcn_fast.ops``: its
fake kernel and autograd formula serve every algorithm).

The 2-D basis is separable, ``B_f(a, c) = b_l(a)·b_m(c)``, so every kernel
works with 1-D passes (K taps each, not K²):

* ``_pass_kernel``: one 1-D pass along H or W, plain or transposed, that adds
  the shifted planes of some input slots, weighted by one tap row each, into
  output slots. It makes ``V_l = b_l ⊛_H x`` and carries the response gradient
  G back: ``gV_l = Σ_{f: l(f)=l} b_m(f) ⊛ᵀ_W G_f``, ``grad x = Σ_l b_l ⊛ᵀ_H gV_l``.
  Its correlation epilogue reduces its output against x shifted along the
  other axis: with gV that is the gradient of the row taps b_l, with
  ``gH_m = Σ_{f: m(f)=m} b_l(f) ⊛ᵀ_H G_f`` (not stored) that of the column taps b_m.
* ``_srf_fwd_kernel``: per (image, pixel block, C_out block) it forms the F
  basis responses ``R_f = b_m(f) ⊛_W V_l(f)`` of a block of input channels in
  registers and meets α in one ``tl.dot`` (``[pixels, F·C_in] × [F·C_in, C_out]``),
  plus the bias. R never reaches memory.
* ``_srf_bwd_weights_kernel``: per (input-channel block, slice of the (image,
  pixel block) items) it forms ``G = αᵀ·gy`` with ``tl.dot`` (stored for the
  passes above) and recomputes R from V for α's gradient (``tl.dot`` with gy).

Partial sums (α's and the taps' gradients) are written per program and
reduced in a fixed order by the host: the backward is deterministic.
Intermediates V, G, gV are float32 and live only within one call (the
autograd graph keeps x, taps and α). The taps come in as a tensor
(``SRFConv2d.taps()``, ``dcn_fast.srf_taps_for``), so nothing is read back to
the host: a call can be captured in a CUDA graph. Runs on the CPU under
``TRITON_INTERPRET=1`` (tiny shapes in the tests).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from dcn_fast import ops
from dcn_fast.basis import pair_index
from dcn_fast.geometry import output_size

__all__ = ["forward", "backward", "supports"]

#: Output channels handled by one program in the backward (all of them).
MAX_OUT_CHANNELS = 256


def supports(input_shape: tuple[int, ...], dtype: torch.dtype, alpha_shape: tuple[int, ...], groups: int) -> str | None:
    """None if the Triton kernels take a call with these shapes, else the reason they do not."""
    if groups != 1:
        return "groups != 1"
    if alpha_shape[2] > MAX_OUT_CHANNELS:
        return f"more than {MAX_OUT_CHANNELS} output channels"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} (float32, float16, bfloat16 only)"
    # The kernels index in int32; the largest buffer is G [B, F, C_in, Ho, Wo] (Ho, Wo <= H, W).
    batch, c_in, height, width = input_shape
    if batch > 65535:
        return "batch > 65535 (a grid dimension of the 1-D passes)"
    if batch * _pow2(alpha_shape[0]) * c_in * height * width >= 2**31:
        return "more than 2^31 elements in the response gradient [B, F, C_in, H, W] (split the batch)"
    return None


@triton.jit
def _shift(pos, t, size, stride, pad, TRANSPOSED: tl.constexpr):
    """Source index of output index ``pos`` at tap t, and whether it exists.

    Plain: ``pos·stride + t - pad``; transposed (the adjoint): ``(pos + pad - t) / stride``, exact divisions only.
    """
    if TRANSPOSED:
        q = pos + pad - t
        src = q // stride
        ok = (q >= 0) & (q % stride == 0) & (src < size)
    else:
        src = pos * stride + t - pad
        ok = (src >= 0) & (src < size)
    return src, ok


@triton.jit
def _plane_tap(ptr, plane, y, x, mask, t, Y, X, stride, pad, AXIS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``ptr[plane]`` (a [Y, X] map) at (y, x) shifted by tap t along AXIS, as float32, zero outside."""
    if AXIS == 0:
        ys, ok = _shift(y, t, Y, stride, pad, TRANSPOSED)
        xs = x
    else:
        xs, ok = _shift(x, t, X, stride, pad, TRANSPOSED)
        ys = y
    return tl.load(ptr + plane * Y * X + ys * X + xs, mask=mask & ok, other=0.0).to(tl.float32)


@triton.jit
def _pass_kernel(
    src_ptr,  # [B, S, C, Y_in, X_in]
    taps_ptr,  # [N+1, K] float32
    terms_ptr,  # [n_terms, 3] int32: (source slot, output slot, tap row)
    dst_ptr,  # [B, J, C, Y_out, X_out] (written if STORE)
    corr_ptr,  # [B, C, Y_c, X_c]: what dst is correlated with (if CORRELATE)
    grad_part_ptr,  # [programs, J_PAD, K_PAD] float32 (if CORRELATE)
    n_terms, S, J, C, Y_in, X_in, Y_out, X_out, stride, pad, Y_c, X_c, corr_stride, corr_pad,
    K: tl.constexpr, AXIS: tl.constexpr, TRANSPOSED: tl.constexpr, J_PAD: tl.constexpr, BLOCK: tl.constexpr,
    STORE: tl.constexpr, CORRELATE: tl.constexpr, K_PAD: tl.constexpr,
):
    """dst[b, j] = Σ_(s, j, n) Σ_t taps[n, t] · src[b, s] shifted by t along AXIS (0: rows, 1: columns).

    CORRELATE: also the per-program partial sums ``Σ_e dst[b, j, e] · corr[b, shift_t(e)]`` for each tap t,
    shifted plainly along the other axis — the tap gradient of the pass that axis belongs to.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1)
    mask = offs < C * Y_out * X_out
    ch = offs // (Y_out * X_out)
    y = (offs // X_out) % Y_out
    x = offs % X_out
    slots = tl.arange(0, J_PAD)
    acc = tl.zeros((J_PAD, BLOCK), dtype=tl.float32)
    for term in range(n_terms):
        s = tl.load(terms_ptr + 3 * term)
        j = tl.load(terms_ptr + 3 * term + 1)
        n = tl.load(terms_ptr + 3 * term + 2)
        part = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(K):
            v = _plane_tap(src_ptr, (b * S + s) * C + ch, y, x, mask, t, Y_in, X_in, stride, pad, AXIS, TRANSPOSED)
            part += tl.load(taps_ptr + n * K + t) * v
        acc += tl.where(slots[:, None] == j, part[None, :], 0.0)
    if STORE:
        tl.store(
            dst_ptr + ((b * J + slots[:, None]) * C + ch[None, :]) * Y_out * X_out + (y * X_out + x)[None, :],
            acc.to(dst_ptr.dtype.element_ty),
            mask=(slots[:, None] < J) & mask[None, :],
        )
    if CORRELATE:
        shifts = tl.arange(0, K_PAD)
        grad = tl.zeros((J_PAD, K_PAD), dtype=tl.float32)
        for t in range(K):  # plain shifts along the other axis
            v = _plane_tap(corr_ptr, b * C + ch, y, x, mask, t, Y_c, X_c, corr_stride, corr_pad, 1 - AXIS, False)
            grad += tl.where(shifts[None, :] == t, tl.sum(acc * v[None, :], axis=1)[:, None], 0.0)
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(grad_part_ptr + (program * J_PAD + slots[:, None]) * K_PAD + shifts[None, :], grad)


@triton.jit
def _basis_pairs(rows_ptr, cols_ptr, F: tl.constexpr, F_PAD: tl.constexpr):
    """Basis index f (padded to F_PAD), its mask and its (l, m) tap rows."""
    fs = tl.arange(0, F_PAD)
    mask_f = fs < F
    rows = tl.load(rows_ptr + fs, mask=mask_f, other=0)
    cols = tl.load(cols_ptr + fs, mask=mask_f, other=0)
    return fs, mask_f, rows, cols


@triton.jit
def _pixel_block(item, n_pixels, width, BLOCK_P: tl.constexpr):
    """Image b and the BLOCK_P pixels (row, col) of work item ``item`` over [B, n_pixels] maps."""
    n_pblocks = tl.cdiv(n_pixels, BLOCK_P)
    b = item // n_pblocks
    offs_p = (item % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, offs_p, offs_p < n_pixels, offs_p // width, offs_p % width


@triton.jit
def _slot_tile(ptr, b, slot, mask_f, offs_i, mask_i, y, x, ok, S, C, Y, X):
    """ptr[b, slot[f], i, y[p], x[p]] as float32 ``[F_PAD, BLOCK_P, BLOCK_I]``, zero where not ok."""
    return tl.load(
        ptr + ((b * S + slot[:, None, None]) * C + offs_i[None, None, :]) * Y * X + (y * X + x)[None, :, None],
        mask=mask_f[:, None, None] & ok[None, :, None] & mask_i[None, None, :],
        other=0.0,
    )


@triton.jit
def _alpha_tile(alpha_ptr, fs, mask_f, offs_i, mask_i, offs_o, mask_o, C, O):
    """α[f, i, o] as ``[F_PAD, BLOCK_I, BLOCK_O]``, zero in the padding."""
    return tl.load(
        alpha_ptr + (fs[:, None, None] * C + offs_i[None, :, None]) * O + offs_o[None, None, :],
        mask=mask_f[:, None, None] & mask_i[None, :, None] & mask_o[None, None, :],
        other=0.0,
    )


@triton.jit
def _flat(tile, BLOCK_P: tl.constexpr, FI: tl.constexpr):
    """[F_PAD, BLOCK_P, BLOCK_I] → [BLOCK_P, F_PAD·BLOCK_I] (f-major columns, as α is laid out)."""
    return tl.reshape(tl.permute(tile, (1, 0, 2)), (BLOCK_P, FI))


@triton.jit
def _srf_fwd_kernel(
    v_ptr,  # [B, L, C, Ho, W] float32: V_l = b_l ⊛_H x
    taps_ptr,  # [L, K] float32
    rows_ptr,  # [F] int64: l of basis f
    cols_ptr,  # [F] int64: m of basis f
    alpha_ptr,  # [F, C, O] float32
    bias_ptr,  # [O] float32 (read if HAS_BIAS)
    out_ptr,  # [B, O, Ho, Wo]
    L, C, W, O, Ho, Wo, stride_w, pad_w,
    K: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    b, offs_p, mask_p, ho, wo = _pixel_block(tl.program_id(0), Ho * Wo, Wo, BLOCK_P)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    fs, mask_f, rows, cols = _basis_pairs(rows_ptr, cols_ptr, F, F_PAD)

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, C, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < C
        resp = tl.zeros((F_PAD, BLOCK_P, BLOCK_I), dtype=tl.float32)
        for c in range(K):
            w, ok = _shift(wo, c, W, stride_w, pad_w, False)
            tile = _slot_tile(v_ptr, b, rows, mask_f, offs_i, mask_i, ho, w, ok & mask_p, L, C, Ho, W)
            resp += tl.load(taps_ptr + cols * K + c, mask=mask_f, other=0.0)[:, None, None] * tile
        al = _alpha_tile(alpha_ptr, fs, mask_f, offs_i, mask_i, offs_o, mask_o, C, O)
        acc += tl.dot(_flat(resp, BLOCK_P, F_PAD * BLOCK_I), tl.reshape(al, (F_PAD * BLOCK_I, BLOCK_O)),
                      input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    out_offs = ((b * O + offs_o[None, :]) * Ho + ho[:, None]) * Wo + wo[:, None]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _srf_bwd_weights_kernel(
    v_ptr,  # [B, L, C, Ho, W] float32: V_l = b_l ⊛_H x
    gy_ptr,  # [B, O, Ho, Wo]
    taps_ptr, rows_ptr, cols_ptr,
    alpha_ptr,  # [F, C, O] float32
    grad_resp_ptr,  # [B, F, C, Ho, Wo] float32, written: G = αᵀ·gy
    alpha_part_ptr,  # [n_split, F_PAD, C, O] float32 partial sums of grad α
    B, L, C, W, O, Ho, Wo, stride_w, pad_w, n_split,
    K: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
    PRECISION: tl.constexpr, NEED_ALPHA: tl.constexpr, NEED_GRAD_RESP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    ib = tl.program_id(0)
    split = tl.program_id(1)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    fs, mask_f, rows, cols = _basis_pairs(rows_ptr, cols_ptr, F, F_PAD)
    al = _alpha_tile(alpha_ptr, fs, mask_f, offs_i, mask_i, offs_o, mask_o, C, O)
    al2t = tl.trans(tl.reshape(al, (F_PAD * BLOCK_I, BLOCK_O)))  # [BLOCK_O, F_PAD·BLOCK_I]
    alpha_acc = tl.zeros((F_PAD * BLOCK_I, BLOCK_O), dtype=tl.float32)

    for item in range(split, B * tl.cdiv(Ho * Wo, BLOCK_P), n_split):
        b, offs_p, mask_p, ho, wo = _pixel_block(item, Ho * Wo, Wo, BLOCK_P)
        gy = tl.load(
            gy_ptr + (b * O + offs_o[None, :]) * Ho * Wo + offs_p[:, None],
            mask=mask_p[:, None] & mask_o[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_P, BLOCK_O]
        if NEED_GRAD_RESP:
            grad_resp = tl.permute(
                tl.reshape(tl.dot(gy, al2t, input_precision=PRECISION), (BLOCK_P, F_PAD, BLOCK_I)), (1, 0, 2)
            )
            tl.store(
                grad_resp_ptr + ((b * F + fs[:, None, None]) * C + offs_i[None, None, :]) * Ho * Wo
                + offs_p[None, :, None],
                grad_resp,
                mask=mask_f[:, None, None] & mask_p[None, :, None] & mask_i[None, None, :],
            )
        if NEED_ALPHA:  # R_f = b_m(f) ⊛_W V_l(f), recomputed, meets gy
            resp = tl.zeros((F_PAD, BLOCK_P, BLOCK_I), dtype=tl.float32)
            for c in range(K):
                w, ok = _shift(wo, c, W, stride_w, pad_w, False)
                tile = _slot_tile(v_ptr, b, rows, mask_f, offs_i, mask_i, ho, w, ok & mask_p, L, C, Ho, W)
                resp += tl.load(taps_ptr + cols * K + c, mask=mask_f, other=0.0)[:, None, None] * tile
            alpha_acc += tl.dot(tl.trans(_flat(resp, BLOCK_P, F_PAD * BLOCK_I)), gy, input_precision=PRECISION)
    if NEED_ALPHA:
        tl.store(
            alpha_part_ptr + ((split * F_PAD + fs[:, None, None]) * C + offs_i[None, :, None]) * O
            + offs_o[None, None, :],
            tl.reshape(alpha_acc, (F_PAD, BLOCK_I, BLOCK_O)),
            mask=mask_i[None, :, None] & mask_o[None, None, :],
        )


# --- host functions ---------------------------------------------------------
# Plain integer helpers: triton.cdiv / next_power_of_2 go through Triton's
# constexpr wrapper (~5 µs a call, ~25 calls per forward+backward).


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(n - 1, 0).bit_length()


_BLOCK_P = 32
_PASS_BLOCK = 256


def forward_config(c_out: int, f_pad: int) -> dict:
    """Tile sizes of ``_srf_fwd_kernel`` (tests/test_triton_compile.py: no register spills on sm_90 at order 2).

    16 input channels per tile, 8 from order 3 on (the responses [F_PAD, BLOCK_P, BLOCK_I] live in
    registers); ``tl.dot`` needs F_PAD·BLOCK_I >= 16.
    """
    block_o = min(max(_pow2(c_out), 16), 64)
    block_i = max(16 if f_pad <= 8 else 8, 16 // f_pad)
    return dict(BLOCK_P=_BLOCK_P, BLOCK_I=block_i, BLOCK_O=block_o, num_warps=4)


def backward_config(c_out: int, f_pad: int) -> dict:
    """Tile sizes of ``_srf_bwd_weights_kernel``: all output channels in one tile, so α's
    ``[F_PAD, BLOCK_I, C_out]`` stays in registers — fewer input channels per tile for wide layers
    (BLOCK_I·BLOCK_O = 512; ptxas for sm_90: no spills at order 2)."""
    block_o = max(_pow2(c_out), 16)
    block_i = max(min(16, 512 // block_o), 16 // f_pad)
    return dict(BLOCK_P=_BLOCK_P, BLOCK_I=block_i, BLOCK_O=block_o, num_warps=4 if block_o <= 32 else 8)


def _precision() -> str:
    """TF32 for the float32 ``tl.dot`` exactly when PyTorch allows it for convolutions
    (``torch.backends.cudnn.allow_tf32``, default on: what ``nn.Conv2d`` and the
    ``dense`` backend's cuDNN call follow), IEEE float32 otherwise."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


@functools.lru_cache(maxsize=None)
def _terms(order: int, kind: str, device: torch.device) -> torch.Tensor:
    """(source slot, output slot, tap row) of each pass, as int32 on ``device`` (cached: no copies per call).

    ``taps``: one input plane to the N+1 tap rows (V); ``responses_w``: G_f to
    gV_l(f) through b_m(f) (along W); ``responses_h``: G_f to gH_m(f) through
    b_l(f) (along H); ``rows``: gV_l to the one input plane through b_l.
    """
    pairs = [(l, m) for l in range(order + 1) for m in range(order - l, -1, -1)]
    terms = {
        "taps": [(0, n, n) for n in range(order + 1)],
        "responses_w": [(f, l, m) for f, (l, m) in enumerate(pairs)],
        "responses_h": [(f, m, l) for f, (l, m) in enumerate(pairs)],
        "rows": [(l, 0, l) for l in range(order + 1)],
    }[kind]
    return torch.tensor(terms, dtype=torch.int32).to(device)


def _pass_grid(batch: int, channels: int, out_size: tuple[int, int]) -> tuple[int, int]:
    """Grid of ``_pass_kernel`` (the long axis first: grid dims 1 and 2 stop at 65535)."""
    return _cdiv(channels * out_size[0] * out_size[1], _PASS_BLOCK), batch


def _one_d_pass(src, taps, order, kind, out_slots, out_size, stride, pad, axis, transposed,
                dtype=torch.float32, store=True, correlate=None):
    """One 1-D pass (``_pass_kernel``) of ``src [B, S, C, Y, X]`` into ``[B, out_slots, C, *out_size]``.

    Returns the output (None if ``store=False``). ``correlate=(x, stride, pad, partials)``: also fills
    ``partials [programs, pow2(out_slots), pow2(K)]`` (programs of :func:`_pass_grid`) with per-program
    partial sums of ``Σ out[b, j, i, e] · x[b, i, e shifted by tap t]`` along the other axis — the tap
    gradient of that axis, once the caller sums ``partials`` over its first dimension.
    """
    batch, slots, channels, y_in, x_in = src.shape
    k, dev = taps.shape[1], src.device
    out = torch.empty(batch, out_slots, channels, *out_size, device=dev, dtype=dtype) if store else None
    terms = _terms(order, kind, dev)
    grid = _pass_grid(batch, channels, out_size)
    x, corr_stride, corr_pad, partials = correlate if correlate is not None else (src, 1, 0, src)
    _pass_kernel[grid](
        src, taps, terms, src if out is None else out, x, partials,
        terms.shape[0], slots, out_slots, channels, y_in, x_in, *out_size, stride, pad,
        *x.shape[-2:], corr_stride, corr_pad,
        K=k, AXIS=axis, TRANSPOSED=transposed, J_PAD=_pow2(out_slots), BLOCK=_PASS_BLOCK,
        STORE=store, CORRELATE=correlate is not None, K_PAD=_pow2(k),
    )
    return out


def _geometry(input, taps, alpha, stride, padding):
    batch, c_in, height, width = input.shape
    k = taps.shape[1]
    out_h = output_size(height, k, stride[0], padding[0])
    out_w = output_size(width, k, stride[1], padding[1])
    return batch, c_in, height, width, alpha.shape[2], k, out_h, out_w


def _row_pass(x, taps, order, stride, padding, out_h):
    """V_l = b_l ⊛_H x with rows strided: ``[B, N+1, C, Ho, W]``."""
    return _one_d_pass(x[:, None], taps, order, "taps", order + 1, (out_h, x.shape[3]), stride[0], padding[0], 0, False)


def forward(input, taps, alpha, bias, order, stride, padding):
    """Output ``[B, C_out, Ho, Wo]`` (input dtype); taps, α and the optional bias are used in float32."""
    x = input.contiguous()
    taps32, alpha32 = taps.float().contiguous(), alpha.float().contiguous()
    batch, c_in, height, width, c_out, k, out_h, out_w = _geometry(x, taps32, alpha32, stride, padding)
    n_basis = alpha.shape[0]
    rows, cols = pair_index(order, x.device)
    v = _row_pass(x, taps32, order, stride, padding, out_h)
    out = torch.empty(batch, c_out, out_h, out_w, device=x.device, dtype=x.dtype)
    f_pad = _pow2(n_basis)
    config = forward_config(c_out, f_pad)
    grid = (batch * _cdiv(out_h * out_w, _BLOCK_P), _cdiv(c_out, config["BLOCK_O"]))
    _srf_fwd_kernel[grid](
        v, taps32, rows, cols, alpha32, alpha32 if bias is None else bias.float().contiguous(), out,
        order + 1, c_in, width, c_out, out_h, out_w, stride[1], padding[1],
        K=k, F=n_basis, F_PAD=f_pad, PRECISION=_precision(), HAS_BIAS=bias is not None, **config,
    )
    return out


def _split(n_iblocks: int, n_items: int, alpha_size: int, device: torch.device) -> int:
    """Item slices per input-channel block: about four programs per SM, while the partial sums of α's
    gradient (``split × alpha_size`` floats) stay within 64 MiB."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(n_items, 2**24 // alpha_size, _cdiv(4 * sms, n_iblocks)))


def backward(grad_out, input, taps, alpha, order, stride, padding, needs):
    """Gradients of (input, taps, alpha); entries not in ``needs`` are None."""
    need_input, need_taps, need_alpha = needs
    x = input.contiguous()
    gy = grad_out.contiguous()
    taps32, alpha32 = taps.float().contiguous(), alpha.float().contiguous()
    batch, c_in, height, width, c_out, k, out_h, out_w = _geometry(x, taps32, alpha32, stride, padding)
    n_basis = alpha.shape[0]
    f_pad = _pow2(n_basis)
    rows, cols = pair_index(order, x.device)
    dev = x.device
    config = backward_config(c_out, f_pad)
    n_iblocks = _cdiv(c_in, config["BLOCK_I"])
    split = _split(n_iblocks, batch * _cdiv(out_h * out_w, _BLOCK_P), f_pad * c_in * c_out, dev)
    unused = torch.empty(1, device=dev)
    need_resp = need_input or need_taps  # G = αᵀ·gy feeds both

    v = _row_pass(x, taps32, order, stride, padding, out_h) if need_alpha else unused
    grad_resp = torch.empty(batch, n_basis, c_in, out_h, out_w, device=dev) if need_resp else unused
    alpha_part = torch.empty(split, f_pad, c_in, c_out, device=dev) if need_alpha else unused
    _srf_bwd_weights_kernel[(n_iblocks, split)](
        v, gy, taps32, rows, cols, alpha32, grad_resp, alpha_part,
        batch, order + 1, c_in, width, c_out, out_h, out_w, stride[1], padding[1], split,
        K=k, F=n_basis, F_PAD=f_pad, PRECISION=_precision(), NEED_ALPHA=need_alpha, NEED_GRAD_RESP=need_resp,
        **config,
    )
    grad_input = grad_taps = grad_alpha = None
    if need_alpha:
        grad_alpha = alpha_part.sum(0)[:n_basis].to(alpha.dtype)
    if need_taps:
        # Both tap gradients (row taps from the W pass, column taps from the H pass) are partial sums
        # in one buffer: one reduction gives their sum, the gradient of the shared taps.
        programs = [math.prod(_pass_grid(batch, c_in, size)) for size in ((out_h, width), (height, out_w))]
        tap_part = torch.empty(sum(programs), _pow2(order + 1), _pow2(k), device=dev)
        row_part, col_part = tap_part.split(programs)
    if need_resp:
        # gV_l = Σ_(f: l(f)=l) b_m(f) ⊛ᵀ_W G_f; against x along H it is the gradient of b_l (row taps).
        grad_v = _one_d_pass(
            grad_resp, taps32, order, "responses_w", order + 1, (out_h, width), stride[1], padding[1], 1, True,
            store=need_input, correlate=(x, stride[0], padding[0], row_part) if need_taps else None,
        )
    if need_taps:
        # gH_m = Σ_(f: m(f)=m) b_l(f) ⊛ᵀ_H G_f against x along W: the gradient of b_m (column taps).
        _one_d_pass(
            grad_resp, taps32, order, "responses_h", order + 1, (height, out_w), stride[0], padding[0], 0, True,
            store=False, correlate=(x, stride[1], padding[1], col_part),
        )
        # Sliced before the reduction, so that the result is contiguous, as the op promises (its fake
        # kernel's strides; torch.compile checks them): a slice of the sum is not when K < K_PAD.
        grad_taps = tap_part[:, : order + 1, :k].sum(0).to(taps.dtype)
    if need_input:
        grad_input = _one_d_pass(grad_v, taps32, order, "rows", 1, (height, width), stride[0], padding[0], 0, True,
                                 dtype=x.dtype)[:, 0]
    return grad_input, grad_taps, grad_alpha


def _op_forward(input, taps, alpha, bias, shift, stride, padding, groups):
    reason = supports(input.shape, input.dtype, alpha.shape, groups)
    if reason is not None:
        raise ValueError(f"the triton backend does not take this call: {reason}")
    return ops.add_shift(forward(input, taps[0, 0], alpha, bias, taps.shape[2] - 1, stride, padding), shift)


def _op_backward(grad_out, input, taps, alpha, stride, padding, groups, mask):
    grad_input, grad_taps, grad_alpha = backward(grad_out, input, taps[0, 0], alpha, taps.shape[2] - 1, stride,
                                                 padding, mask)
    return grad_input, None if grad_taps is None else grad_taps[None, None], grad_alpha


# The op's CUDA kernel (dcn_fast.ops) runs these for algorithm="triton"; on the CPU only under Triton's interpreter.
ops.register_algorithm(
    "triton",
    ops.Algorithm(
        _op_forward, _op_backward, any_taps=False,
        devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
    ),
)
