"""Fused elementwise kernels (RMSNorm, add+RMSNorm, rotary q/k, SiLU-and-mul) against the torch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (fp32/fp16 only: numpy has no
bf16), so shapes stay small. With CUDA the same tests run on the GPU, plus bf16 and a CUDA-graph replay.
"""
import pytest
import torch

# tests/conftest.py runs Triton in its interpreter on machines without CUDA.
pytest.importorskip("triton", reason="triton is not installed: these kernels cannot run")

from loopserve.model.fused_ops import (
    fused_add_rms_norm,
    fused_add_rms_norm_torch,
    rms_norm,
    rms_norm_torch,
    rotary_qk_,
    rotary_qk_store_kv_,
    rotary_qk_store_kv_torch_,
    rotary_qk_torch_,
    rotary_torch,
    silu_and_mul,
    silu_and_mul_torch,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# bf16 cannot go through the interpreter (numpy has no bf16), so it is checked on CUDA only.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs CUDA"))]
# atol as specified; the rtol allows one rounding step of the dtype at |values| of a few units,
# where one fp16 ulp (2**-9 in [2, 4)) is already ~2e-3.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 2e-2, "rtol": 1e-2}}
EPS = 1e-6
MAX_POS = 4096


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale + shift).to(device=DEVICE, dtype=dtype)


def _cos_sin_cache(head_dim: int, max_pos: int = MAX_POS, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("t", [1, 5])
def test_rms_norm_matches_torch(t, hidden, dtype):
    x = _randn(t, hidden, dtype=dtype, seed=t * 100 + hidden, scale=3.0)
    w = _randn(hidden, dtype=dtype, seed=7, scale=0.1, shift=1.0)
    out = rms_norm(x, w, EPS, use_triton=True)
    ref = rms_norm_torch(x, w, EPS)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("t", [1, 5])
def test_fused_add_rms_norm_matches_torch(t, hidden, dtype):
    x = _randn(t, hidden, dtype=dtype, seed=t * 10 + hidden, scale=0.5)
    residual = _randn(t, hidden, dtype=dtype, seed=t * 10 + hidden + 1, scale=2.0)
    w = _randn(hidden, dtype=dtype, seed=8, scale=0.1, shift=1.0)
    x_before, res_before = x.clone(), residual.clone()
    out, summed = fused_add_rms_norm(x, residual, w, EPS, use_triton=True)
    ref_out, ref_summed = fused_add_rms_norm_torch(x, residual, w, EPS)
    # The new residual is bit-for-bit the rounded sum; the inputs are untouched.
    assert summed.dtype == x.dtype
    assert torch.equal(summed, x + residual)
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    # And the normalised output is the norm of that rounded sum.
    torch.testing.assert_close(out, rms_norm_torch(ref_summed, w, EPS), **TOL[dtype])


def test_rms_norm_strided_rows_and_fp32_weight():
    """Rows of a wider tensor (row stride != H) and an fp32 weight on fp16 activations."""
    base = _randn(5, 160, dtype=torch.float16, seed=3, scale=2.0)
    x = base[:, 32:128]  # [5, 96], row stride 160
    w = _randn(96, dtype=torch.float32, seed=4, scale=0.1, shift=1.0)
    out = rms_norm(x, w, EPS, use_triton=True)
    ref = rms_norm_torch(x, w, EPS)
    assert out.dtype == torch.float32  # promote_types(fp32 weight, fp16 x), as the reference
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


def test_torch_rms_norm_is_the_transformers_formula():
    """The reference is the model's pre-fusion RMSNorm (transformers' LlamaRMSNorm order)."""
    x = _randn(5, 96, dtype=torch.float16, seed=11, scale=2.0)
    w = _randn(96, dtype=torch.float16, seed=12, scale=0.1, shift=1.0)
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    expected = w * (h * torch.rsqrt(variance + EPS)).to(torch.float16)
    assert torch.equal(rms_norm_torch(x, w, EPS), expected)


# ---------------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------------

def _qkv_views(t, n_q, n_kv, d, dtype, seed):
    """q, k as non-contiguous views into one fused [T, (Hq + 2 Hkv) * D] qkv tensor."""
    qkv = _randn(t, (n_q + 2 * n_kv) * d, dtype=dtype, seed=seed)
    q_size, kv_size = n_q * d, n_kv * d
    q = qkv[:, :q_size].view(t, n_q, d)
    k = qkv[:, q_size:q_size + kv_size].view(t, n_kv, d)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("t", [1, 5])
def test_rotary_qk_matches_torch(t, head_dim, heads, dtype):
    n_q, n_kv = heads
    cache = _cos_sin_cache(head_dim)
    positions = torch.randint(0, MAX_POS, (t,), generator=_gen(t + head_dim)).to(DEVICE)
    qkv, q, k = _qkv_views(t, n_q, n_kv, head_dim, dtype, seed=t * 1000 + head_dim + n_q)
    assert t == 1 or not (q.is_contiguous() or k.is_contiguous())  # one row is trivially contiguous
    ref_qkv = qkv.clone()
    ref_q = ref_qkv[:, :n_q * head_dim].view(t, n_q, head_dim)
    ref_k = ref_qkv[:, n_q * head_dim:(n_q + n_kv) * head_dim].view(t, n_kv, head_dim)
    rotary_qk_torch_(ref_q, ref_k, positions, cache)

    rotary_qk_(q, k, positions, cache, use_triton=True)
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    torch.testing.assert_close(k, ref_k, **TOL[dtype])
    # v (and anything else outside q and k) is untouched.
    v_start = (n_q + n_kv) * head_dim
    assert torch.equal(qkv[:, v_start:], ref_qkv[:, v_start:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (3, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("head_dim", [16, 48, 64])
@pytest.mark.parametrize("t", [1, 5])
def test_rotary_qk_store_kv_matches_rotary_then_cache_write(t, head_dim, heads, dtype):
    """One kernel = rotary on q and k in place + the new k and v in the paged cache at their slots;
    every other cache entry is untouched."""
    n_q, n_kv = heads
    blocks, block_size = 6, 4
    cache = _cos_sin_cache(head_dim)
    positions = torch.randint(0, MAX_POS, (t,), generator=_gen(t + head_dim + n_q)).to(DEVICE)
    slots = torch.randperm(blocks * block_size, generator=_gen(head_dim))[:t].to(DEVICE)
    qkv, q, k = _qkv_views(t, n_q, n_kv, head_dim, dtype, seed=t * 7 + head_dim + n_kv)
    v = qkv[:, (n_q + n_kv) * head_dim:].view(t, n_kv, head_dim)
    kc = _randn(blocks, block_size, n_kv, head_dim, dtype=dtype, seed=5)
    vc = _randn(blocks, block_size, n_kv, head_dim, dtype=dtype, seed=6)
    ref_qkv, ref_kc, ref_vc = qkv.clone(), kc.clone(), vc.clone()
    ref_q = ref_qkv[:, :n_q * head_dim].view(t, n_q, head_dim)
    ref_k = ref_qkv[:, n_q * head_dim:(n_q + n_kv) * head_dim].view(t, n_kv, head_dim)
    ref_v = ref_qkv[:, (n_q + n_kv) * head_dim:].view(t, n_kv, head_dim)
    rotary_qk_store_kv_torch_(ref_q, ref_k, ref_v, positions, cache, ref_kc, ref_vc, slots)

    rotary_qk_store_kv_(q, k, v, positions, cache, kc, vc, slots, use_triton=True)
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    torch.testing.assert_close(k, ref_k, **TOL[dtype])
    assert torch.equal(v, ref_v)
    flat_kc, flat_ref_kc = kc.view(-1, n_kv, head_dim), ref_kc.view(-1, n_kv, head_dim)
    torch.testing.assert_close(flat_kc[slots], flat_ref_kc[slots], **TOL[dtype])
    assert torch.equal(flat_kc[slots], k)  # the cache holds exactly the rotated k
    assert torch.equal(vc, ref_vc)
    others = torch.ones(blocks * block_size, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert torch.equal(flat_kc[others], flat_ref_kc[others])


def test_rotary_qk_store_kv_falls_back_or_refuses_bad_inputs():
    t, n_q, n_kv, d = 2, 4, 2, 16
    cache = _cos_sin_cache(d)
    positions = torch.tensor([3, 9], device=DEVICE)
    _, q, k = _qkv_views(t, n_q, n_kv, d, torch.float32, seed=1)
    v = torch.zeros(t, n_kv, d, device=DEVICE)
    heads_outer = torch.zeros(n_kv, 4, 4, d, device=DEVICE)  # the CPU layout: not this kernel's
    with pytest.raises(ValueError, match="caches"):
        rotary_qk_store_kv_(q, k, v, positions, cache, heads_outer, heads_outer.clone(), positions,
                            use_triton=True)


def test_rotary_qk_odd_half_dim_and_int32_positions():
    """D / 2 not a power of two (masked tail) and int32 positions."""
    t, n_q, n_kv, d = 3, 3, 1, 48
    cache = _cos_sin_cache(d)
    positions = torch.tensor([0, 17, MAX_POS - 1], dtype=torch.int32, device=DEVICE)
    _, q, k = _qkv_views(t, n_q, n_kv, d, torch.float32, seed=21)
    ref_q, ref_k = q.clone(), k.clone()
    rotary_qk_torch_(ref_q, ref_k, positions.long(), cache)
    rotary_qk_(q, k, positions, cache, use_triton=True)
    torch.testing.assert_close(q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(k, ref_k, **TOL[torch.float32])


def test_torch_rotary_is_the_rotate_half_formula():
    """The reference equals x * cat(cos, cos) + rotate_half(x) * cat(sin, sin) bit for bit."""
    d, t = 64, 5
    cache = _cos_sin_cache(d)
    positions = torch.randint(0, MAX_POS, (t,), generator=_gen(5)).to(DEVICE)
    x = _randn(t, 4, d, dtype=torch.float16, seed=6)
    cos, sin = cache[positions].unsqueeze(1).to(x.dtype).chunk(2, dim=-1)
    rotate_half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    expected = x * torch.cat([cos, cos], dim=-1) + rotate_half * torch.cat([sin, sin], dim=-1)
    assert torch.equal(rotary_torch(x, positions, cache), expected)


# ---------------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 96])
@pytest.mark.parametrize("t", [1, 5])
def test_silu_and_mul_matches_torch(t, inter, dtype):
    gate_up = _randn(t, 2 * inter, dtype=dtype, seed=t * 7 + inter, scale=2.0)
    out = silu_and_mul(gate_up, use_triton=True)
    ref = silu_and_mul_torch(gate_up)
    assert out.shape == (t, inter) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_silu_and_mul_multiple_column_blocks_and_strided_rows():
    """I larger than one column block (300 > 256 at small T) and rows of a wider tensor."""
    base = _randn(2, 700, dtype=torch.float32, seed=9, scale=3.0)
    gate_up = base[:, 50:650]  # [2, 600], row stride 700
    out = silu_and_mul(gate_up, use_triton=True)
    torch.testing.assert_close(out, silu_and_mul_torch(gate_up), **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter numpy
def test_silu_and_mul_extreme_gate():
    gate = torch.tensor([[-1000.0, -80.0, 0.0, 80.0, 1000.0]], device=DEVICE)
    gate_up = torch.cat([gate, torch.full_like(gate, 2.0)], dim=-1)
    out = silu_and_mul(gate_up, use_triton=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, silu_and_mul_torch(gate_up), **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_cpu_tensors_use_the_torch_path_bit_for_bit():
    x = torch.randn(3, 96, generator=_gen(1), dtype=torch.float32).half()
    r = torch.randn(3, 96, generator=_gen(2), dtype=torch.float32).half()
    w = torch.randn(96, generator=_gen(3), dtype=torch.float32).half()
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_torch(x, w, EPS))
    out, summed = fused_add_rms_norm(x, r, w, EPS)
    ref_out, ref_summed = fused_add_rms_norm_torch(x, r, w, EPS)
    assert torch.equal(out, ref_out) and torch.equal(summed, ref_summed)
    gu = torch.randn(3, 128, generator=_gen(4))
    assert torch.equal(silu_and_mul(gu), silu_and_mul_torch(gu))
    qkv = torch.randn(2, 6 * 16, generator=_gen(5))
    ref = qkv.clone()
    cache = torch.randn(32, 16, generator=_gen(6))
    positions = torch.tensor([3, 31])
    rotary_qk_(qkv[:, :64].view(2, 4, 16), qkv[:, 64:80].view(2, 1, 16), positions, cache)
    rotary_qk_torch_(ref[:, :64].view(2, 4, 16), ref[:, 64:80].view(2, 1, 16), positions, cache)
    assert torch.equal(qkv, ref)


def test_forced_triton_rejects_unsupported_inputs():
    x = torch.randn(2, 64, dtype=torch.float64)
    w = torch.ones(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, w, EPS, use_triton=True)
    # Left to auto-dispatch, the same input takes the reference path.
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_torch(x, w, EPS))
    with pytest.raises(ValueError, match="odd"):
        silu_and_mul(torch.randn(2, 7), use_triton=True)


# ---------------------------------------------------------------------------------------------
# CUDA only: a CUDA-graph capture of all four ops, replayed with new inputs
# ---------------------------------------------------------------------------------------------

@cuda_only
def test_ops_capture_in_a_cuda_graph():
    t, hidden, n_q, n_kv, d, inter = 4, 4096, 32, 8, 128, 14336
    dtype = torch.bfloat16
    x = _randn(t, hidden, dtype=dtype, seed=1)
    res = _randn(t, hidden, dtype=dtype, seed=2)
    w = _randn(hidden, dtype=dtype, seed=3, scale=0.1, shift=1.0)
    qkv = _randn(t, (n_q + 2 * n_kv) * d, dtype=dtype, seed=4)
    gu = _randn(t, 2 * inter, dtype=dtype, seed=5)
    cache = _cos_sin_cache(d)
    positions = torch.zeros(t, dtype=torch.long, device=DEVICE)
    q = qkv[:, :n_q * d].view(t, n_q, d)
    k = qkv[:, n_q * d:(n_q + n_kv) * d].view(t, n_kv, d)

    def step():
        normed, new_res = fused_add_rms_norm(x, res, w, EPS)
        rotary_qk_(q, k, positions, cache)
        return rms_norm(normed, w, EPS), new_res, silu_and_mul(gu)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    # New contents in the same buffers, then replay.
    x.copy_(_randn(t, hidden, dtype=dtype, seed=11))
    res.copy_(_randn(t, hidden, dtype=dtype, seed=12))
    qkv.copy_(_randn(t, (n_q + 2 * n_kv) * d, dtype=dtype, seed=14))
    gu.copy_(_randn(t, 2 * inter, dtype=dtype, seed=15))
    positions.copy_(torch.tensor([0, 1, 1000, MAX_POS - 1], device=DEVICE))
    ref_qkv = qkv.clone()
    graph.replay()
    torch.cuda.synchronize()

    ref_normed, ref_res = fused_add_rms_norm_torch(x, res, w, EPS)
    tol = TOL[dtype]
    torch.testing.assert_close(outs[0], rms_norm_torch(ref_normed, w, EPS), **tol)
    assert torch.equal(outs[1], ref_res)
    torch.testing.assert_close(outs[2], silu_and_mul_torch(gu), **tol)
    ref_q = ref_qkv[:, :n_q * d].view(t, n_q, d)
    ref_k = ref_qkv[:, n_q * d:(n_q + n_kv) * d].view(t, n_kv, d)
    rotary_qk_torch_(ref_q, ref_k, positions, cache)
    torch.testing.assert_close(qkv, ref_qkv, **tol)
