"""Fused elementwise steps of a decoder layer, as one Triton kernel each on CUDA (a decode step is
hundreds of small kernels, so every launch saved shows), with the plain torch ops elsewhere:
residual add + RMSNorm, rotary embedding of q and k in place (alone, or with the KV cache store),
SiLU(gate) * up, and the KV cache store. Each computes what its torch version computes, in the same precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeserve.model.pdl import pdl_options, pdl_start

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions below run everywhere
    triton = None


FORCE_TRITON = False  # tests: run the kernels on CPU tensors under Triton's interpreter


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or FORCE_TRITON)


# ---- residual add + RMSNorm -----------------------------------------------------------------------
def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); the norm in fp32, scaled after the cast
    back, as the reference implementation does. `residual` None: x itself is the residual.
    `pdl`: launched with programmatic dependent launch where `pdl.launch_pdl` allows."""
    if not _use_triton(x):
        summed = x if residual is None else x + residual
        normed = F.rms_norm(summed.float(), weight.shape, eps=eps)
        return weight * normed.to(x.dtype), summed
    x = x.contiguous()
    n, width = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    _add_rmsnorm_kernel[(n,)](
        x, x if residual is None else residual, weight, out, summed, width, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(width),
        **pdl_options(x, pdl),
    )  # fmt: skip
    return out, summed


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x, res, w, out, summed, width, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        v = tl.load(x + row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            v = add_rounded(v, tl.load(res + row + cols, mask=mask, other=0.0))
            tl.store(summed + row + cols, v, mask=mask)
        f = v.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(f * f, 0) / width + eps)
        weight = tl.load(w + cols, mask=mask, other=0.0)
        tl.store(out + row + cols, rms_scale(v, rstd, weight), mask=mask)

    @triton.jit
    def rms_scale(v, rstd, weight):
        """weight * (v * rstd): the norm's rounding (fp32, back to v's dtype, then the weight,
        the product rounded once to v's dtype)."""
        normed = (v.to(tl.float32) * rstd).to(v.dtype)
        return (weight.to(tl.float32) * normed.to(tl.float32)).to(v.dtype)

    @triton.jit
    def add_rounded(a, b):
        """a + b rounded to a's dtype: fp32 holds the sum of two 16-bit floats closely enough
        that rounding it again gives the 16-bit sum's bits (as a 16-bit add, or torch's). Triton's
        interpreter adds and multiplies bf16 wrongly; this form and `rms_scale`'s run there too."""
        return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


# ---- rotary embedding -------------------------------------------------------------------------------
def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D) rotated in place (rotate-half layout); cos, sin (N, D). Returns x."""
    if not _use_triton(x) or x.stride(-1) != 1:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos[:, None, :] + rotated * sin[:, None, :])
        return x
    n, heads, d = x.shape
    _rotate_kernel[(n,)](
        x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads,
        HALF=d // 2, HEADS_PAD=triton.next_power_of_2(heads), HALF_PAD=triton.next_power_of_2(d // 2),
    )  # fmt: skip
    return x


if triton is not None:

    @triton.jit
    def _rotate_kernel(x, cos, sin, stride_n, stride_h, stride_c, heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HALF_PAD)[None, :]
        mask = (h < heads) & (d < HALF)
        base = x + n * stride_n + h * stride_h + d
        lo = tl.load(base, mask=mask, other=0.0)
        hi = tl.load(base + HALF, mask=mask, other=0.0)
        c_lo = tl.load(cos + n * stride_c + d, mask=d < HALF, other=0.0)
        c_hi = tl.load(cos + n * stride_c + HALF + d, mask=d < HALF, other=0.0)
        s_lo = tl.load(sin + n * stride_c + d, mask=d < HALF, other=0.0)
        s_hi = tl.load(sin + n * stride_c + HALF + d, mask=d < HALF, other=0.0)
        # the torch version's rounding: each product in x's dtype, then their sum
        tl.store(base, lo * c_lo + (-hi) * s_lo, mask=mask)
        tl.store(base + HALF, hi * c_hi + lo * s_hi, mask=mask)


def rotate_store_kv_(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
) -> None:
    """qkv (N, (heads + 2 kv_heads) * D), q | k | v: rotates q and k in place and writes k and v
    into the caches at `slots`; one kernel for what `rotate_` and `store_kv` do in two. `pdl` as
    for `add_rmsnorm`."""
    n = qkv.shape[0]
    d = k_cache.shape[-1]
    rotated = heads + kv_heads
    if not _use_triton(qkv) or qkv.stride(-1) != 1:
        rotate_(qkv[:, : rotated * d].view(n, rotated, d), cos, sin)
        k = qkv[:, heads * d : rotated * d].view(n, kv_heads, d)
        store_kv(k, qkv[:, rotated * d :].view(n, kv_heads, d), k_cache, v_cache, slots)
        return
    _rotate_store_kernel[(n,)](
        qkv, cos, sin, k_cache, v_cache, slots, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), heads, kv_heads, HALF=d // 2,
        HEADS_PAD=triton.next_power_of_2(rotated), HALF_PAD=triton.next_power_of_2(d // 2),
        KV_PAD=triton.next_power_of_2(kv_heads), **pdl_options(qkv, pdl),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rotate_store_kernel(qkv, cos, sin, kc, vc, slots, stride_n, stride_c, sc_s, sc_h, heads, kv_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, KV_PAD: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        pdl_start(PDL)
        n = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots + n).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HALF_PAD)[None, :]
        mask = (h < heads + kv_heads) & (d < HALF)
        base = qkv + n * stride_n + h * (2 * HALF) + d
        lo = tl.load(base, mask=mask, other=0.0)
        hi = tl.load(base + HALF, mask=mask, other=0.0)
        c_lo = tl.load(cos + n * stride_c + d, mask=d < HALF, other=0.0)
        c_hi = tl.load(cos + n * stride_c + HALF + d, mask=d < HALF, other=0.0)
        s_lo = tl.load(sin + n * stride_c + d, mask=d < HALF, other=0.0)
        s_hi = tl.load(sin + n * stride_c + HALF + d, mask=d < HALF, other=0.0)
        new_lo = lo * c_lo + (-hi) * s_lo  # as in _rotate_kernel
        new_hi = hi * c_hi + lo * s_hi
        tl.store(base, new_lo, mask=mask)
        tl.store(base + HALF, new_hi, mask=mask)
        is_k = mask & (h >= heads)  # the k heads, rotated, into the cache as well
        k_at = kc + slot * sc_s + (h - heads) * sc_h + d
        tl.store(k_at, new_lo, mask=is_k)
        tl.store(k_at + HALF, new_hi, mask=is_k)
        vh = tl.arange(0, KV_PAD)[:, None]
        vd = tl.arange(0, 2 * HALF_PAD)[None, :]
        v_mask = (vh < kv_heads) & (vd < 2 * HALF)
        v_row = qkv + n * stride_n + (heads + kv_heads) * (2 * HALF)
        v = tl.load(v_row + vh * (2 * HALF) + vd, mask=v_mask)
        tl.store(vc + slot * sc_s + vh * sc_h + vd, v, mask=v_mask)


# ---- SiLU(gate) * up ---------------------------------------------------------------------------------
def silu_and_mul(gate_up: torch.Tensor, inter: int, pdl: bool = False) -> torch.Tensor:
    """gate_up (N, 2 * inter) -> silu(gate) * up, (N, inter). `pdl` as for `add_rmsnorm`."""
    if not _use_triton(gate_up):
        gate, up = gate_up.split(inter, dim=-1)
        return F.silu(gate) * up
    n = gate_up.shape[0]
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), inter, BLOCK=block, **pdl_options(gate_up, pdl)
    )
    return out


if triton is not None:

    @triton.jit
    def silu_mul_values(g, u):
        """silu(g) * u of rounded g and u: SiLU in fp32, rounded to g's dtype, times u, the
        product rounded to g's dtype (exact in fp32 for 16-bit floats, so the same bits as a
        16-bit multiply; Triton's interpreter multiplies bf16 wrongly). The one definition of
        its rounding (deterministic mode's matmul fuses it too)."""
        silu = (g.to(tl.float32) / (1.0 + tl.exp(-g.to(tl.float32)))).to(g.dtype)
        return (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, stride, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gate_up + n * stride + cols, mask=mask, other=0.0)
        u = tl.load(gate_up + n * stride + inter + cols, mask=mask, other=0.0)
        tl.store(out + n * inter + cols, silu_mul_values(g, u), mask=mask)


# ---- KV cache store ---------------------------------------------------------------------------------
def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """k, v (N, Hkv, D) into the caches (slots, Hkv, D) at `slots` (N,)."""
    if not _use_triton(k):
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        return
    n, heads, d = k.shape
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), heads, D=d,
        HEADS_PAD=triton.next_power_of_2(heads), D_PAD=triton.next_power_of_2(d),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k, v, kc, vc, slots, sk_n, sk_h, sv_n, sv_h, sc_s, sc_h, heads, D: tl.constexpr, HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots + n).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < heads) & (d < D)
        tl.store(
            kc + slot * sc_s + h * sc_h + d,
            tl.load(k + n * sk_n + h * sk_h + d, mask=mask),
            mask=mask,
        )
        tl.store(
            vc + slot * sc_s + h * sc_h + d,
            tl.load(v + n * sv_n + h * sv_h + d, mask=mask),
            mask=mask,
        )
