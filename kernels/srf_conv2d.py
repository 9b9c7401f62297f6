"""Triton kernels of ``dcn_fast::srf_conv2d`` (groups = 1), layered
kernel → host function → ``autograd.Function``.

Forward: one program per (image, block of output pixels, block of output
channels). For each block of input channels and each tap offset (a, c) it
loads the shifted input tile once and adds it, weighted by
``B_f(a, c) = b_l(a)·b_m(c)`` for all F basis functions at once, into the
basis responses ``R[F, pixels, channels]`` held in registers; R then meets α
in one ``tl.dot`` (``[pixels, F·channels] × [F·channels, C_out]``). The basis
responses never reach memory.

Backward: one kernel per (input-channel block, slice of the (image, pixel
block) items) recomputes R for α's gradient, forms ``G = αᵀ·gy`` (the
gradient of R) with ``tl.dot``, accumulates the gradient of every basis
weight ``B_f(a, c)`` and stores G; a second kernel gathers G back through the
transposed taps into the input gradient. Partial sums of α and of the basis
weights are written per program and reduced in a fixed order by the host:
the backward is deterministic. Cost: G ([B, F, C_in, Ho·Wo]) is the one
intermediate written to memory.

The taps come in as a tensor (``dcn_fast.srf_taps_for``), so nothing is read
back to the host: a call can be captured in a CUDA graph. Runs on the CPU
under ``TRITON_INTERPRET=1`` (tiny shapes in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcn_fast.basis import pair_index

__all__ = ["srf_conv2d_triton", "supports"]

#: Output channels handled by one program in the backward (all of them).
MAX_OUT_CHANNELS = 256


def supports(input: torch.Tensor, alpha: torch.Tensor, groups: int) -> str | None:
    """None if the Triton kernels take this call, else the reason they do not."""
    if groups != 1:
        return "groups != 1"
    if alpha.shape[2] > MAX_OUT_CHANNELS:
        return f"more than {MAX_OUT_CHANNELS} output channels"
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {input.dtype} (float32, float16, bfloat16 only)"
    return None


@triton.jit
def _basis_weights(taps_ptr, rows, cols, mask_f, a, c, K: tl.constexpr):
    """B_f(a, c) = b_l(a) · b_m(c) for the F basis functions, as a [F_PAD] vector."""
    row_tap = tl.load(taps_ptr + rows * K + a, mask=mask_f, other=0.0)
    col_tap = tl.load(taps_ptr + cols * K + c, mask=mask_f, other=0.0)
    return row_tap * col_tap


@triton.jit
def _basis_pairs(rows_ptr, cols_ptr, F: tl.constexpr, F_PAD: tl.constexpr):
    """Basis index f (padded to F_PAD), its mask and its (l, m) taps."""
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
def _shifted_input(x_ptr, b, offs_i, mask_i, ho, wo, mask_p, a, c, C, H, W, stride_h, stride_w, pad_h, pad_w):
    """x[b, i, ho·sH + a - pH, wo·sW + c - pW] as float32 ``[BLOCK_P, BLOCK_I]``, zero outside the image."""
    h = ho * stride_h + a - pad_h
    w = wo * stride_w + c - pad_w
    ok = mask_p & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return tl.load(
        x_ptr + ((b * C + offs_i[None, :]) * H + h[:, None]) * W + w[:, None],
        mask=ok[:, None] & mask_i[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _alpha_tile(alpha_ptr, fs, mask_f, offs_i, mask_i, offs_o, mask_o, C, O):
    """α[f, i, o] as ``[F_PAD, BLOCK_I, BLOCK_O]``, zero in the padding."""
    return tl.load(
        alpha_ptr + (fs[:, None, None] * C + offs_i[None, :, None]) * O + offs_o[None, None, :],
        mask=mask_f[:, None, None] & mask_i[None, :, None] & mask_o[None, None, :],
        other=0.0,
    )


@triton.jit
def _srf_fwd_kernel(
    x_ptr,  # [B, C, H, W]
    taps_ptr,  # [N+1, K] float32
    rows_ptr,  # [F] int64: l of basis f
    cols_ptr,  # [F] int64: m of basis f
    alpha_ptr,  # [F, C, O] float32
    out_ptr,  # [B, O, Ho, Wo]
    C, H, W, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
    K: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, PRECISION: tl.constexpr,
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
        for a in range(K):
            for c in range(K):
                xv = _shifted_input(x_ptr, b, offs_i, mask_i, ho, wo, mask_p, a, c, C, H, W,
                                    stride_h, stride_w, pad_h, pad_w)
                weights = _basis_weights(taps_ptr, rows, cols, mask_f, a, c, K)
                resp += weights[:, None, None] * xv[None, :, :]
        al = _alpha_tile(alpha_ptr, fs, mask_f, offs_i, mask_i, offs_o, mask_o, C, O)
        resp2 = tl.reshape(tl.permute(resp, (1, 0, 2)), (BLOCK_P, F_PAD * BLOCK_I))
        acc += tl.dot(resp2, tl.reshape(al, (F_PAD * BLOCK_I, BLOCK_O)), input_precision=PRECISION)
    out_offs = ((b * O + offs_o[None, :]) * Ho + ho[:, None]) * Wo + wo[:, None]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _srf_bwd_weights_kernel(
    x_ptr,  # [B, C, H, W]
    gy_ptr,  # [B, O, Ho, Wo]
    taps_ptr, rows_ptr, cols_ptr,
    alpha_ptr,  # [F, C, O] float32
    grad_resp_ptr,  # [B, F, C, Ho*Wo] float32, written: G = αᵀ·gy
    alpha_part_ptr,  # [SPLIT, F_PAD, C, O] float32 partial sums of grad α
    basis_part_ptr,  # [n_iblocks, SPLIT, F_PAD, K, K] float32 partial sums of grad B_f(a, c)
    B, C, H, W, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
    K: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    NEED_ALPHA: tl.constexpr, NEED_BASIS: tl.constexpr, NEED_GRAD_RESP: tl.constexpr,
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
    al2t = tl.trans(tl.reshape(al, (F_PAD * BLOCK_I, BLOCK_O)))  # [BLOCK_O, F_PAD*BLOCK_I]
    alpha_acc = tl.zeros((F_PAD * BLOCK_I, BLOCK_O), dtype=tl.float32)
    basis_base = basis_part_ptr + ((ib * SPLIT + split) * F_PAD + fs) * K * K  # [F_PAD]

    for item in range(split, B * tl.cdiv(Ho * Wo, BLOCK_P), SPLIT):
        b, offs_p, mask_p, ho, wo = _pixel_block(item, Ho * Wo, Wo, BLOCK_P)
        gy = tl.load(
            gy_ptr + (b * O + offs_o[None, :]) * Ho * Wo + offs_p[:, None],
            mask=mask_p[:, None] & mask_o[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_P, BLOCK_O]
        grad_resp = tl.permute(
            tl.reshape(tl.dot(gy, al2t, input_precision=PRECISION), (BLOCK_P, F_PAD, BLOCK_I)), (1, 0, 2)
        )
        if NEED_GRAD_RESP:
            tl.store(
                grad_resp_ptr + ((b * F + fs[:, None, None]) * C + offs_i[None, None, :]) * Ho * Wo
                + offs_p[None, :, None],
                grad_resp,
                mask=mask_f[:, None, None] & mask_p[None, :, None] & mask_i[None, None, :],
            )
        resp = tl.zeros((F_PAD, BLOCK_P, BLOCK_I), dtype=tl.float32)
        for a in range(K):
            for c in range(K):
                xv = _shifted_input(x_ptr, b, offs_i, mask_i, ho, wo, mask_p, a, c, C, H, W,
                                    stride_h, stride_w, pad_h, pad_w)
                if NEED_ALPHA:
                    weights = _basis_weights(taps_ptr, rows, cols, mask_f, a, c, K)
                    resp += weights[:, None, None] * xv[None, :, :]
                if NEED_BASIS:
                    # This program owns its slot of the partial buffer: load, add, store.
                    part = tl.sum(tl.sum(grad_resp * xv[None, :, :], axis=2), axis=1)  # [F_PAD]
                    slot = basis_base + a * K + c
                    tl.store(slot, tl.load(slot, mask=mask_f, other=0.0) + part, mask=mask_f)
        if NEED_ALPHA:
            resp2t = tl.trans(tl.reshape(tl.permute(resp, (1, 0, 2)), (BLOCK_P, F_PAD * BLOCK_I)))
            alpha_acc += tl.dot(resp2t, gy, input_precision=PRECISION)
    if NEED_ALPHA:
        acc3 = tl.reshape(alpha_acc, (F_PAD, BLOCK_I, BLOCK_O))
        tl.store(
            alpha_part_ptr + ((split * F_PAD + fs[:, None, None]) * C + offs_i[None, :, None]) * O
            + offs_o[None, None, :],
            acc3,
            mask=mask_f[:, None, None] & mask_i[None, :, None] & mask_o[None, None, :],
        )


@triton.jit
def _srf_bwd_input_kernel(
    grad_resp_ptr,  # [B, F, C, Ho*Wo] float32
    taps_ptr, rows_ptr, cols_ptr,
    grad_x_ptr,  # [B, C, H, W]
    C, H, W, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
    K: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """grad_x[i, h, w] = Σ_f Σ_(a,c) B_f(a, c) · G[f, i, (h + pH - a)/sH, (w + pW - c)/sW] (exact divisions only)."""
    b, offs_p, mask_p, h, w = _pixel_block(tl.program_id(0), H * W, W, BLOCK_P)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    fs, mask_f, rows, cols = _basis_pairs(rows_ptr, cols_ptr, F, F_PAD)
    acc = tl.zeros((BLOCK_P, BLOCK_I), dtype=tl.float32)
    for a in range(K):
        hs = h + pad_h - a
        ho = hs // stride_h
        row_ok = mask_p & (hs >= 0) & (hs % stride_h == 0) & (ho < Ho)
        for c in range(K):
            ws = w + pad_w - c
            wo = ws // stride_w
            ok = row_ok & (ws >= 0) & (ws % stride_w == 0) & (wo < Wo)
            g = tl.load(
                grad_resp_ptr + ((b * F + fs[:, None, None]) * C + offs_i[None, None, :]) * Ho * Wo
                + (ho * Wo + wo)[None, :, None],
                mask=mask_f[:, None, None] & ok[None, :, None] & mask_i[None, None, :],
                other=0.0,
            )
            weights = _basis_weights(taps_ptr, rows, cols, mask_f, a, c, K)
            acc += tl.sum(weights[:, None, None] * g, axis=0)
    tl.store(
        grad_x_ptr + ((b * C + offs_i[None, :]) * H + h[:, None]) * W + w[:, None],
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=mask_p[:, None] & mask_i[None, :],
    )


# --- host functions ---------------------------------------------------------

_BLOCK_P = 32
_BLOCK_I = 16
_SPLIT = 32


def _precision() -> str:
    """TF32 for float32 GEMMs exactly when PyTorch allows it for matmuls (default: off)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _geometry(input, taps, alpha, order, stride, padding):
    batch, c_in, height, width = input.shape
    order1, k = taps.shape
    n_basis, _, c_out = alpha.shape
    out_h = (height + 2 * padding[0] - k) // stride[0] + 1
    out_w = (width + 2 * padding[1] - k) // stride[1] + 1
    rows, cols = pair_index(order, input.device)
    f_pad = max(triton.next_power_of_2(n_basis), 1)
    return batch, c_in, height, width, c_out, k, out_h, out_w, n_basis, f_pad, rows, cols


def forward(input, taps, alpha, order, stride, padding):
    """Output ``[B, C_out, Ho, Wo]`` (input dtype); taps and α are used in float32."""
    x = input.contiguous()
    taps32, alpha32 = taps.float().contiguous(), alpha.float().contiguous()
    batch, c_in, height, width, c_out, k, out_h, out_w, n_basis, f_pad, rows, cols = _geometry(
        x, taps32, alpha32, order, stride, padding
    )
    out = torch.empty(batch, c_out, out_h, out_w, device=x.device, dtype=x.dtype)
    block_o = min(max(triton.next_power_of_2(c_out), 16), 64)
    grid = (batch * triton.cdiv(out_h * out_w, _BLOCK_P), triton.cdiv(c_out, block_o))
    _srf_fwd_kernel[grid](
        x, taps32, rows, cols, alpha32, out,
        c_in, height, width, c_out, out_h, out_w, stride[0], stride[1], padding[0], padding[1],
        K=k, F=n_basis, F_PAD=f_pad, PRECISION=_precision(), BLOCK_P=_BLOCK_P, BLOCK_I=_BLOCK_I, BLOCK_O=block_o,
    )
    return out


def backward(grad_out, input, taps, alpha, order, stride, padding, needs):
    """Gradients of (input, taps, alpha); entries not in ``needs`` are None."""
    need_input, need_taps, need_alpha = needs
    x = input.contiguous()
    gy = grad_out.contiguous()
    taps32, alpha32 = taps.float().contiguous(), alpha.float().contiguous()
    batch, c_in, height, width, c_out, k, out_h, out_w, n_basis, f_pad, rows, cols = _geometry(
        x, taps32, alpha32, order, stride, padding
    )
    block_o = max(triton.next_power_of_2(c_out), 16)
    n_iblocks = triton.cdiv(c_in, _BLOCK_I)
    dev = x.device
    grad_resp = torch.empty(batch, n_basis, c_in, out_h * out_w, device=dev) if need_input else torch.empty(1, device=dev)
    alpha_part = torch.zeros(_SPLIT, f_pad, c_in, c_out, device=dev) if need_alpha else torch.empty(1, device=dev)
    basis_part = torch.zeros(n_iblocks, _SPLIT, f_pad, k, k, device=dev) if need_taps else torch.empty(1, device=dev)
    _srf_bwd_weights_kernel[(n_iblocks, _SPLIT)](
        x, gy, taps32, rows, cols, alpha32, grad_resp, alpha_part, basis_part,
        batch, c_in, height, width, c_out, out_h, out_w, stride[0], stride[1], padding[0], padding[1],
        K=k, F=n_basis, F_PAD=f_pad, SPLIT=_SPLIT, PRECISION=_precision(),
        NEED_ALPHA=need_alpha, NEED_BASIS=need_taps, NEED_GRAD_RESP=need_input,
        BLOCK_P=_BLOCK_P, BLOCK_I=_BLOCK_I, BLOCK_O=block_o,
        # α's tile [F_PAD, BLOCK_I, C_out] stays in registers: more warps for wide layers.
        num_warps=8 if block_o >= 128 else 4,
    )
    grad_input = grad_taps = grad_alpha = None
    if need_alpha:
        grad_alpha = alpha_part.sum(0)[:n_basis].to(alpha.dtype)
    if need_taps:
        grad_basis = basis_part.sum((0, 1))[:n_basis]  # [F, K, K]: dL/dB_f(a, c)
        # B_f = b_l ⊗ b_m: each tap collects its row role and its column role.
        row_grad = torch.einsum("fac,fc->fa", grad_basis, taps32[cols])
        col_grad = torch.einsum("fac,fa->fc", grad_basis, taps32[rows])
        grad_taps = torch.zeros_like(taps32).index_add_(0, rows, row_grad).index_add_(0, cols, col_grad)
        grad_taps = grad_taps.to(taps.dtype)
    if need_input:
        grad_input = torch.empty_like(x)
        grid = (batch * triton.cdiv(height * width, _BLOCK_P), n_iblocks)
        _srf_bwd_input_kernel[grid](
            grad_resp, taps32, rows, cols, grad_input,
            c_in, height, width, out_h, out_w, stride[0], stride[1], padding[0], padding[1],
            K=k, F=n_basis, F_PAD=f_pad, BLOCK_P=_BLOCK_P, BLOCK_I=_BLOCK_I,
        )
    return grad_input, grad_taps, grad_alpha


class _SRFConv2dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, taps, alpha, order, stride, padding):
        ctx.save_for_backward(input, taps, alpha)
        ctx.geometry = (order, stride, padding)
        return forward(input, taps, alpha, order, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, taps, alpha = ctx.saved_tensors
        order, stride, padding = ctx.geometry
        grads = backward(grad_out, input, taps, alpha, order, stride, padding, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


def srf_conv2d_triton(input, taps, alpha, order, stride, padding, groups):
    """Triton SRF convolution (same contract as :func:`dcn_fast.separable.separable_srf_conv2d`)."""
    reason = supports(input, alpha, groups)
    if reason is not None:
        raise ValueError(f"the triton backend does not take this call: {reason}")
    return _SRFConv2dTriton.apply(input, taps, alpha, order, tuple(stride), tuple(padding))
