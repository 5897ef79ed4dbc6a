"""Fused elementwise ops for the decoder: RMSNorm (plain and with the residual add), rotary
embedding on q and k together (optionally also writing the new k and v into the paged KV cache), and
SiLU-and-mul, each a single Triton kernel.

Why fused
---------
In a captured decode step the GEMMs are most of the useful work, yet plain PyTorch spends a string
of tiny kernels around them: RMSNorm is ~6 launches (pow, mean, add+rsqrt, mul, cast, weight mul),
rotary ~7 for q and again for k (gather, two casts, chunk-muls, subtract/add, cat), SiLU*mul ~3.
At decode batch sizes each of those is launch- and latency-bound, not bandwidth-bound, so ~30 of
them per layer cost more than the elementwise math itself. Here each op is one launch that reads
its inputs once, does the math in fp32 registers and writes the result once.

Dispatch
--------
Every public op runs its Triton kernel when the input is a CUDA tensor and Triton is importable,
otherwise the ``*_torch`` reference (the exact code the model used before). ``use_triton=True``
forces the kernel (the tests use it on CPU under ``TRITON_INTERPRET=1``); ``use_triton=False``
forces the reference. When ``use_triton`` is left at ``None`` and a kernel cannot take the input
(unsupported dtype, RMSNorm wider than ``MAX_NORM_DIM``, a non-contiguous last dim where one is
needed) the op quietly falls back to the reference; with ``use_triton=True`` it raises instead.

Nothing here reads a tensor value on the host: launch grids and block sizes depend only on shapes,
so every op can be captured in a CUDA graph and replayed with new tensor contents. Positions are
not range-checked (that would need a sync): ``0 <= positions < cos_sin_cache.shape[0]`` is the
caller's promise, as it is for ``index_select`` in the reference.

Numerics contract (kernel vs ``*_torch`` on the same inputs)
-----------------------------------------------------------
* ``fused_add_rms_norm``'s returned residual is **bit-for-bit** ``x + residual``: the sum of two
  values of ``x.dtype`` is formed in fp32 and rounded once (round-to-nearest-even), which is what
  PyTorch's add does for fp16/bf16/fp32.
* RMSNorm keeps the reference's order: fp32 ``x * rsqrt(mean(x^2) + eps)``, rounded to
  ``x.dtype`` *before* the weight multiply, the product in fp32 rounded once to
  ``promote_types(weight.dtype, x.dtype)``. The weight product is exact (both factors fit in fp32's
  mantissa), so the only difference is the fp32 inverse RMS (reduction order, sqrt/div
  implementation): a last-bit difference there can flip the rounding of an element, so results
  agree within 1 ulp of the output dtype (usually exactly), not bit-for-bit.
* Rotary rounds cos/sin to ``x.dtype`` as the reference does, then computes
  ``x1*cos - x2*sin`` / ``x2*cos + x1*sin`` in fp32 with one rounding, where the reference (for
  fp16/bf16) rounds each product and the sum; results agree within ~1 ulp of ``x.dtype``. In fp32
  the compiler may fuse the multiply-add, giving last-bit differences.
* SiLU-and-mul computes ``silu(gate) * up`` in fp32 with one rounding (the reference rounds after
  the SiLU and after the product): within ~1 ulp of the dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

HAS_TRITON = triton is not None

# Widest row one RMSNorm program holds in registers (BLOCK = next_power_of_2(H)).
MAX_NORM_DIM = 8192
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rotary: elements per half-head tile [BLOCK_H, BLOCK_D] of one program.
_ROPE_TILE = 1024


# ----------------------------------------------------------------------------------------------
# Reference (plain PyTorch) implementations: the fallbacks, and what the tests compare against.
# ----------------------------------------------------------------------------------------------

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 compute, cast back to x.dtype before the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype before normalising."""
    summed = (x + residual).to(x.dtype)
    return rms_norm_torch(summed, weight, eps), summed


def rotary_torch(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox ("rotate_half") rotary on x [T, H, D]; cos_sin_cache [max_pos, D] = cat(cos, sin)."""
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_qk_torch_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """In-place reference rotary on q [T, Hq, D] and k [T, Hkv, D]."""
    q.copy_(rotary_torch(q, positions, cos_sin_cache))
    k.copy_(rotary_torch(k, positions, cos_sin_cache))


def rotary_qk_store_kv_torch_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> None:
    """Reference: rotary in place on q and k, then rotated k and v written to the paged cache
    [num_blocks, block_size, Hkv, D] at their slots."""
    rotary_qk_torch_(q, k, positions, cos_sin_cache)
    nb, bs, h, d = key_cache.shape
    key_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(value_cache.dtype))


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def _use_triton(x: torch.Tensor, use_triton: bool | None, unsupported: str | None) -> bool:
    """Whether to run the kernel. `unsupported` is why the kernel cannot take these inputs, if so."""
    if use_triton is None:
        return HAS_TRITON and x.is_cuda and unsupported is None
    if not use_triton:
        return False
    if not HAS_TRITON:
        raise RuntimeError("use_triton=True but triton is not installed")
    if unsupported is not None:
        raise ValueError(f"the Triton kernel cannot take these inputs: {unsupported}")
    return True


def _dtype_problem(*tensors: torch.Tensor) -> str | None:
    for t in tensors:
        if t.dtype not in _TRITON_DTYPES:
            return f"dtype {t.dtype} (supported: {', '.join(map(str, _TRITON_DTYPES))})"
    return None


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
        n_cols, stride_x, stride_r, stride_o, stride_ro, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per row; the whole row (BLOCK >= n_cols) lives in registers.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            # Round the sum to x.dtype (exactly PyTorch's add), store it, normalise the rounded value.
            s = (x + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
            x = s.to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        inv_rms = 1.0 / tl.sqrt(var + eps)
        # Cast back to the input dtype before the weight multiply, as the reference does.
        h = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(
        x_ptr, stride_t, stride_h, tok, h0, n_heads, half, cos, sin,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Rotate heads [h0, h0 + BLOCK_H) of token `tok` in place; cos/sin are fp32 [BLOCK_D].
        # Returns the rotated halves (fp32), their heads and mask, for callers that store them elsewhere too.
        heads = h0 + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < n_heads) & (d[None, :] < half)
        p1 = x_ptr + tok * stride_t + heads[:, None].to(tl.int64) * stride_h + d[None, :]
        p2 = p1 + half
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        c = cos[None, :]
        s = sin[None, :]
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p2, o2.to(x_ptr.dtype.element_ty), mask=mask)
        return o1, o2, heads, mask

    @triton.jit
    def _rotary_qk_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, slot_ptr, kc_ptr, vc_ptr,
        n_q_heads, n_k_heads, half, n_q_blocks,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pos, stride_cache,
        stride_slot, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, STORE_KV: tl.constexpr,
    ):
        # Grid (T, q head blocks + k head blocks): blocks [0, n_q_blocks) rotate q in place, the rest k.
        # With STORE_KV a k block also writes its rotated k to the key cache row of the token's slot and
        # copies v to the value cache (v_ptr, slot_ptr, kc_ptr, vc_ptr are unused otherwise).
        tok = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        pos = tl.load(pos_ptr + tok * stride_pos).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        row = cache_ptr + pos * stride_cache
        # Round cos/sin to the activation dtype first, as the reference does.
        cos = tl.load(row + d, mask=dmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.load(row + half + d, mask=dmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
        if hb < n_q_blocks:
            _rope_heads(q_ptr, stride_qt, stride_qh, tok, hb * BLOCK_H, n_q_heads, half, cos, sin,
                        BLOCK_H, BLOCK_D)
        else:
            o1, o2, heads, mask = _rope_heads(k_ptr, stride_kt, stride_kh, tok, (hb - n_q_blocks) * BLOCK_H,
                                              n_k_heads, half, cos, sin, BLOCK_H, BLOCK_D)
            if STORE_KV:
                heads = heads.to(tl.int64)
                slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
                # The cache gets k rounded to k's dtype first, exactly what the in-place k holds.
                o1 = o1.to(k_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty)
                o2 = o2.to(k_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty)
                dst_k = kc_ptr + slot * stride_kc_slot + heads[:, None] * stride_kc_h + d[None, :]
                tl.store(dst_k, o1, mask=mask)
                tl.store(dst_k + half, o2, mask=mask)
                src_v = v_ptr + tok * stride_vt + heads[:, None] * stride_vh + d[None, :]
                dst_v = vc_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_h + d[None, :]
                tl.store(dst_v, tl.load(src_v, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=mask)
                tl.store(dst_v + half, tl.load(src_v + half, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def silu_times(gate, up):
        """silu(gate) * up in fp32, the one formula of every kernel that fuses the SiLU-mul."""
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def _silu_and_mul_kernel(
        gu_ptr, out_ptr, n_cols, stride_gu, stride_o,
        BLOCK: tl.constexpr,
    ):
        # Grid (rows, column blocks); gate is gu[:, :n_cols], up is gu[:, n_cols:].
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        base = gu_ptr + row * stride_gu
        g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = silu_times(g, u)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def _norm_problem(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    problem = _dtype_problem(x, weight) if residual is None else _dtype_problem(x, weight, residual)
    if problem:
        return problem
    if x.shape[-1] > MAX_NORM_DIM:
        return f"hidden size {x.shape[-1]} > MAX_NORM_DIM ({MAX_NORM_DIM})"
    if weight.shape != x.shape[-1:]:
        return f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}"
    if residual is not None and residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} != x dtype {x.dtype}"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as 2-D [rows, last] with a unit last stride (a view when possible, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    w = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    n_rows = x2.shape[0]
    if n_rows == 0 or hidden == 0:
        return out, res_out
    out2 = out.view(-1, hidden)
    res_out2 = res_out.view(-1, hidden) if res_out is not None else out2
    block = _next_power_of_2(hidden)
    num_warps = min(16, max(1, block // 256))
    _rms_norm_kernel[(n_rows,)](
        x2, r2 if r2 is not None else x2, w, out2, res_out2,
        hidden, x2.stride(0), (r2 if r2 is not None else x2).stride(0), out2.stride(0), res_out2.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             use_triton: bool | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [T, H] (leading dims are flattened) with weight [H]."""
    if not _use_triton(x, use_triton, _norm_problem(x, weight, None)):
        return rms_norm_torch(x, weight, eps)
    return _rms_norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x.dtype first.

    Neither input is modified; both results are new tensors.
    """
    if not _use_triton(x, use_triton, _norm_problem(x, weight, residual)):
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    out, summed = _rms_norm_launch(x, residual, weight, eps)
    return out, summed


def _rotary_problem(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor) -> str | None:
    problem = _dtype_problem(q, k, cos_sin_cache)
    if problem:
        return problem
    if q.dim() != 3 or k.dim() != 3:
        return f"q and k must be [T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}"
    if q.dtype != k.dtype:
        return f"q dtype {q.dtype} != k dtype {k.dtype}"
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or positions.shape != (t,):
        return f"mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}"
    if d % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d:
        return f"head dim {d} must be even and match cos_sin_cache {tuple(cos_sin_cache.shape)}"
    if (q.stride(2) != 1 and d > 1) or (k.stride(2) != 1 and d > 1):
        return "the last dim of q and k must be contiguous (the rotation is in place)"
    if positions.dtype not in (torch.int32, torch.int64):
        return f"positions dtype {positions.dtype} (need int32 or int64)"
    return None


def _rotary_launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    """The rotary kernel; `store` = (v, key_cache, value_cache, slot_mapping) also writes the cache."""
    t, n_q, d = q.shape
    n_k = k.shape[1]
    if t == 0 or d == 0:
        return
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    half = d // 2
    block_d = _next_power_of_2(half)
    block_h = min(_next_power_of_2(max(n_q, n_k)), max(1, _ROPE_TILE // block_d))
    n_q_blocks = triton.cdiv(n_q, block_h)
    n_k_blocks = triton.cdiv(n_k, block_h)
    if store is None:
        v, kc, vc, slots = k, k, k, positions  # unused by the kernel without STORE_KV
    else:
        v, key_cache, value_cache, slots = store
        kc, vc = key_cache.view(-1, n_k, d), value_cache.view(-1, n_k, d)
    _rotary_qk_kernel[(t, n_q_blocks + n_k_blocks)](
        q, k, v, positions, cache, slots, kc, vc,
        n_q, n_k, half, n_q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), positions.stride(0),
        cache.stride(0), slots.stride(0), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        BLOCK_H=block_h, BLOCK_D=block_d, STORE_KV=store is not None, num_warps=4,
    )


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *,
               use_triton: bool | None = None) -> None:
    """Neox rotary in place on q [T, Hq, D] and k [T, Hkv, D] (views with any token/head strides).

    positions [T] (int64 or int32) index cos_sin_cache [max_pos, D] = cat(cos, sin) (fp32).
    """
    if not _use_triton(q, use_triton, _rotary_problem(q, k, positions, cos_sin_cache)):
        rotary_qk_torch_(q, k, positions, cos_sin_cache)
        return
    _rotary_launch(q, k, positions, cos_sin_cache, None)


def rotary_store_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> str | None:
    problem = _rotary_problem(q, k, positions, cos_sin_cache) or _dtype_problem(v, key_cache, value_cache)
    if problem:
        return problem
    if v.shape != k.shape or (v.stride(2) != 1 and v.shape[2] > 1):
        return f"v {tuple(v.shape)} must be shaped like k {tuple(k.shape)} with a contiguous last dim"
    if key_cache.dim() != 4 or key_cache.shape[2:] != k.shape[1:] or value_cache.shape != key_cache.shape:
        return (f"caches must be [blocks, block_size, Hkv, D] matching k: key {tuple(key_cache.shape)}, "
                f"value {tuple(value_cache.shape)}, k {tuple(k.shape)}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return "the caches must be contiguous"
    if slot_mapping.shape != positions.shape or slot_mapping.dtype not in (torch.int32, torch.int64):
        return f"slot_mapping must be [T] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
    return None


def rotary_qk_store_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, use_triton: bool | None = None) -> None:
    """Rotary in place on q [T, Hq, D] and k [T, Hkv, D], and the new tokens' rotated k and v written to
    the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]: one launch for what is
    otherwise a rotary kernel and two cache writes in every layer of every step."""
    problem = rotary_store_problem(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    if not _use_triton(q, use_triton, problem):
        rotary_qk_store_kv_torch_(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
        return
    _rotary_launch(q, k, positions, cos_sin_cache, (v, key_cache, value_cache, slot_mapping))


def silu_and_mul(gate_up: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up [T, I], with gate, up = gate_up.chunk(2, -1)."""
    problem = _dtype_problem(gate_up)
    if problem is None and gate_up.shape[-1] % 2:
        problem = f"last dim {gate_up.shape[-1]} is odd"
    if not _use_triton(gate_up, use_triton, problem):
        return silu_and_mul_torch(gate_up)
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    gu2 = _rows(gate_up)
    n_rows = gu2.shape[0]
    if n_rows == 0 or inter == 0:
        return out
    out2 = out.view(-1, inter)
    # Small batches (decode) get more, smaller programs so the row is spread over more SMs.
    block = min(_next_power_of_2(inter), 1024 if n_rows >= 64 else 256)
    _silu_and_mul_kernel[(n_rows, triton.cdiv(inter, block))](
        gu2, out2, inter, gu2.stride(0), out2.stride(0),
        BLOCK=block, num_warps=4,
    )
    return out
