"""Fused kernels against their plain-torch references: loss and gradients within the tolerances
of tests/support/kernels.py (relative to each tensor's own scale, from the dtype's precision and
the reduction length), odd shapes, non-contiguous inputs, determinism; and the comparison shown
to reject wrong gradients at every dtype and size tested. On a CPU machine the kernels run under
the Triton interpreter (conftest sets TRITON_INTERPRET=1 when no GPU is present); on a machine
with CUDA they run natively, compiled and autotuned."""

import re

import pytest
import torch
import torch.nn.functional as F

import kernels.contrastive as kc
import kernels.variational as kv
from kernels import reference
from tests.support.kernels import (
    assert_rejects_mutations,
    close,
    error,
    feats,
    gen,
    interpreter_only,
    mutations,
    tolerance,
)
from tests.support.memory import PeakAllocations


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into the Triton paths, so a silent fallback to torch fails the test."""
    calls = {"lse": 0, "grad": 0}
    lse, grad = kc._lse_triton, kc._grad_triton

    def lse_spy(*a, **k):
        calls["lse"] += 1
        return lse(*a, **k)

    def grad_spy(*a, **k):
        calls["grad"] += 1
        return grad(*a, **k)

    monkeypatch.setattr(kc, "_lse_triton", lse_spy)
    monkeypatch.setattr(kc, "_grad_triton", grad_spy)
    return calls


# fp16 at every shape in make test-all (its large-batch case is in make test, below)
FP16_HEAVY = pytest.param(torch.float16, marks=pytest.mark.heavy, id="float16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP16_HEAVY])
@pytest.mark.parametrize(
    "b,d,smoothing,deterministic",
    [
        (1, 8, 0.0, False),
        (37, 24, 0.0, False),
        (70, 33, 0.1, True),
        (130, 64, 0.0, False),
        (65, 100, 0.2, False),
        (33, 1, 0.1, False),  # D = 1
        (19, 2048, 0.0, True),  # D = 2048: 128 feature chunks per tile
        (1, 1, 0.0, True),
    ],
)
def test_contrastive_matches_reference(spy, dtype, b, d, smoothing, deterministic):
    x, y = feats(b, d, dtype, 1), feats(b, d, dtype, 2, transpose=True)
    s = torch.tensor(14.2857, requires_grad=True)
    loss = kc.contrastive_loss(x, y, s, smoothing, deterministic=deterministic)
    loss.backward()
    got = (loss.detach(), x.grad, y.grad, s.grad)
    x.grad = y.grad = s.grad = None
    ref = reference.contrastive_loss(x, y, s, smoothing)
    ref.backward()
    # one recompute gives dX and dY; deterministic: a second pass for dY instead of atomics
    assert spy == {"lse": 1, "grad": 2 if deterministic else 1}
    k = max(b, d)  # the longest sum: over the features (logits) or the batch (softmax)
    cancels = (
        float(s) if b == 1 else 0.0
    )  # one pair: loss and gradients 0 up to the logits' rounding
    close(got[0], ref.detach(), dtype, k, cancels)
    for g, r in zip(got[1:], (x.grad, y.grad, s.grad)):
        assert g.dtype == r.dtype
        close(g, r, dtype, k, cancels)


CONTRASTIVE_SIZES = [
    (b, d) for b, d in [(37, 24), (70, 33), (130, 64), (65, 100), (33, 1), (19, 2048)]
]
CONTRASTIVE_SIZES += [(4099, 512)]  # the native test's size (its reference runs on the CPU too)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", CONTRASTIVE_SIZES)
def test_the_comparison_rejects_wrong_contrastive_gradients(dtype, b, d):
    """`close` can fail: at each dtype and size the kernels are tested at, it rejects an all-zero
    gradient, a doubled one and the other input's (the logits transposed), and accepts the
    reference rounded to the dtype. (B = 1 is left out: its loss and gradients are 0.)"""
    x, y = feats(b, d, dtype, 1), feats(b, d, dtype, 2)
    s = torch.tensor(14.2857, requires_grad=True)
    reference.contrastive_loss(x.float(), y.float(), s, 0.1).backward()
    gx, gy = x.grad.float(), y.grad.float()
    k = max(b, d)
    assert_rejects_mutations(gx, gy, dtype, k, f"B={b}, D={d}")
    assert all(error(w, gx) > 10 * tolerance(dtype, k) for _, w in mutations(gx, gy))


@pytest.mark.parametrize("batch", [65536, 131072])
def test_fp16_backward_at_a_large_batch_matches_fp32(batch):
    """The gradient's G = coef (p_row + p_col) - targets has entries of about 1 / (2 B) x a
    probability: at B = 65,536 they sit below fp16's smallest normal (6e-5), and a G cast to fp16
    as it is loses them (an all-but-zero gradient). The backward casts G scaled by a power of two
    instead. Here: the backward kernel itself on 64 rows with the coefficients of a global batch
    of `batch` (what the interpreter can run), in fp16, against the same computation in fp32."""
    b, d = 64, 32
    x, y = feats(b, d, torch.float16, 1).detach(), feats(b, d, torch.float16, 2).detach()
    s = torch.tensor(14.0)
    lse_a, _, lse_b = kc._lse_torch(x, y, s, 0, 1.0, 0.0)
    c = 1 / (2 * batch)
    want = kc._grad_torch(x, y, s, lse_a, lse_b, c, 2 * c, 0.0, 0, True)
    got = kc._grad_triton(x, y, s, lse_a, lse_b, c, 2 * c, 0.0, 0, True)
    assert not kc.dot_in_fp32(torch.float16)  # the half-precision tiles, not an fp32 detour
    for g, w in zip(got, want):
        close(g, w, torch.float16, max(b, d))


@pytest.mark.parametrize("deterministic", [False, True])
def test_contrastive_is_bitwise_reproducible(deterministic):
    def run():
        x, y = feats(70, 40, torch.bfloat16, 3), feats(70, 40, torch.bfloat16, 4)
        s = torch.tensor(20.0, requires_grad=True)
        loss = kc.contrastive_loss(x, y, s, 0.1, deterministic=deterministic)
        loss.backward()
        return loss, x.grad, y.grad, s.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.fixture
def dot_flops(monkeypatch):
    """FLOPs of every tl.dot the interpreter executes (2 M N K each, padding included)."""
    from triton.runtime.interpreter import InterpreterBuilder

    count = [0]
    create_dot = InterpreterBuilder.create_dot

    def counting(self, a, b, d, *rest):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        count[0] += 2 * m * n * k
        return create_dot(self, a, b, d, *rest)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting)
    return count


@interpreter_only
@pytest.mark.parametrize("deterministic", [False, True])
def test_contrastive_executes_8_b2_d_flops(dot_flops, deterministic):
    b, d = 64, 32  # multiples of the interpreter's tiles: no padding in the count
    x, y = feats(b, d, torch.float32, 5), feats(b, d, torch.float32, 6)
    s = torch.tensor(10.0)
    loss = kc.contrastive_loss(x, y, s, deterministic=deterministic)
    assert dot_flops[0] == 2 * b * b * d  # the forward: the logits once
    loss.backward()
    assert dot_flops[0] == kc.executed_flops(b, d, deterministic)
    assert dot_flops[0] == (10 if deterministic else 8) * b * b * d


@interpreter_only
@pytest.mark.parametrize(
    "dtype,sizes",
    [
        pytest.param(torch.float32, (128, 512), marks=pytest.mark.heavy),  # 25 s: make test-all
        (torch.bfloat16, (160,)),
    ],
)
def test_contrastive_peak_memory_follows_the_formula_and_is_linear_in_b(dtype, sizes):
    d, peaks = 8, {}
    for b in sizes:
        x, y = feats(b, d, dtype, 7), feats(b, d, dtype, 8)
        s = torch.tensor(10.0)
        programs = kc.forward_programs(b, x.device)
        with PeakAllocations() as memory:
            loss = kc.contrastive_loss(x, y, s)
            forward = memory.peak
            loss.backward()
        formula = kc.peak_extra_bytes(b, d, x.element_size(), programs)
        assert forward <= 4 * b * (programs + 3) + 64, (b, forward)  # + a few scalars
        assert 0.95 * formula <= memory.peak <= formula + 64, (b, memory.peak, formula)
        peaks[b] = memory.peak
    if len(sizes) == 2:  # O(B): four times the batch, four times the memory
        assert peaks[sizes[1]] <= 4.05 * peaks[sizes[0]]


def test_contrastive_noncontiguous_strided_views(spy):
    base = feats(80, 48, torch.float32, 3)
    x = base[::2].detach().requires_grad_()  # row stride 96
    yfull = feats(40, 96, torch.float32, 4)
    y = yfull[:, ::2].detach().requires_grad_()  # column stride 2
    assert not x.is_contiguous() or not y.is_contiguous()
    s = torch.tensor(10.0)
    kc.contrastive_loss(x, y, s).backward()
    gx, gy = x.grad, y.grad
    x2, y2 = x.detach().contiguous().requires_grad_(), y.detach().contiguous().requires_grad_()
    reference.contrastive_loss(x2, y2, s).backward()
    close(gx, x2.grad, torch.float32)
    close(gy, y2.grad, torch.float32)


def test_module_learns_log_scale_and_torch_fallback_agrees(monkeypatch):
    x, y = feats(33, 16, torch.float32, 5), feats(33, 16, torch.float32, 6)
    mod = kc.ContrastiveLoss(init_scale=1 / 0.07)
    mod(x, y).backward()
    g_kernel = mod.log_scale.grad.clone()
    ref_scale = mod.log_scale.detach().clone().requires_grad_()
    reference.contrastive_loss(x, y, ref_scale.exp()).backward()
    close(g_kernel, ref_scale.grad, torch.float32)
    assert g_kernel.abs() > 0
    monkeypatch.setattr(kc, "use_triton", lambda *t: False)  # a CPU without the interpreter
    mod.log_scale.grad = None
    mod(x, y).backward()
    close(mod.log_scale.grad, g_kernel, torch.float32)


def test_contrastive_rejects_bad_input():
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="must both be B x D"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(5, 8), s)
    with pytest.raises(ValueError, match="share a dtype"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8).bfloat16(), s)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2))


def stats(shape, dtype, seed=0, transpose=False):
    g = gen(seed)
    out = []
    for i in range(4):
        t = torch.randn(shape, generator=g) * (2.0 if i % 2 else 1.0)
        if transpose:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        out.append(t.to(dtype).requires_grad_())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,direction,reduction",
    [
        ((1, 1), "qp", "mean"),
        ((5, 7, 33), "qp", "mean"),
        ((9, 1500), "pq", "sum"),
        ((6, 100), "qp", "none"),
    ],
)
def test_variational_matches_reference(dtype, shape, direction, reduction):
    ins = stats(shape, dtype, 1, transpose=len(shape) == 2 and shape[0] > 1)
    with torch.no_grad():
        ins[1][(0,) * len(shape)] = -45.0  # below LOGVAR_MIN: clamped, zero gradient
        ins[3][(-1,) * len(shape)] = 25.0  # above LOGVAR_MAX
    eps = torch.randn(shape, generator=gen(2)).to(dtype)
    z, kl = kv.variational_fusion(*ins, eps=eps, direction=direction, reduction=reduction)
    w = torch.randn(shape, generator=gen(3))
    wk = torch.randn(kl.shape, generator=gen(4))
    ((z.float() * w).sum() + (kl * wk).sum()).backward()
    got = [z.detach(), kl.detach()] + [t.grad for t in ins]
    for t in ins:
        t.grad = None
    zr, klr = reference.variational_fusion(*ins, eps, direction, reduction)
    ((zr.float() * w).sum() + (klr * wk).sum()).backward()
    assert z.dtype == dtype and kl.dtype == torch.float32
    for g, r in zip(got, [zr.detach(), klr.detach()] + [t.grad for t in ins]):
        close(g, r, dtype)
    assert ins[1].grad[(0,) * len(shape)] == 0 and ins[3].grad[(-1,) * len(shape)] == 0


VARIATIONAL_SHAPES = [
    ((5, 7, 33), "qp", "mean"),
    ((9, 1500), "pq", "sum"),
    ((6, 100), "qp", "none"),
]
VARIATIONAL_SHAPES += [((32768 // 64, 4096), "qp", "mean")]  # the bench's shape, 64x fewer rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,direction,reduction", VARIATIONAL_SHAPES)
def test_the_comparison_rejects_wrong_variational_gradients(dtype, shape, direction, reduction):
    """As for the contrastive loss: at each tested dtype and shape the comparison rejects a zero,
    a doubled, and another input's gradient (mu_p's for mu_q's: the mean's two sides swapped),
    and accepts the reference rounded to the dtype. ((1, 1) is left out: one element.)"""
    ins = [t.detach().float().requires_grad_() for t in stats(shape, dtype, 1)]
    eps = torch.randn(shape, generator=gen(2))
    z, kl = reference.variational_fusion(*ins, eps, direction, reduction)
    w = torch.randn(shape, generator=gen(3))
    ((z * w).sum() + kl.sum()).backward()
    k = shape[-1] if reduction != "none" else 1
    for g, other in [(ins[0].grad, ins[2].grad), (ins[1].grad, ins[3].grad)]:
        assert_rejects_mutations(g, other, dtype, k, f"shape {shape}")


def test_variational_seeded_noise_is_reproducible_and_standard_normal():
    mu, lv = torch.zeros(128, 300), torch.zeros(128, 300)
    z1, _ = kv.variational_fusion(mu, lv, mu, lv, seed=3)
    z2, _ = kv.variational_fusion(mu, lv, mu, lv, seed=3)
    z3, _ = kv.variational_fusion(mu, lv, mu, lv, seed=4)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    assert abs(z1.mean().item()) < 0.02 and abs(z1.std().item() - 1) < 0.02


def test_variational_seeded_backward_uses_the_same_noise():
    mq, lq, mp, lp = stats((16, 50), torch.float32, 5)
    z, kl = kv.variational_fusion(mq, lq, mp, lp, seed=11)
    (z.sum() + kl).backward()
    eps = (
        (z - mq) / torch.exp(0.5 * lq.clamp(reference.LOGVAR_MIN, reference.LOGVAR_MAX))
    ).detach()
    got = [t.grad for t in (mq, lq, mp, lp)]
    for t in (mq, lq, mp, lp):
        t.grad = None
    zr, klr = reference.variational_fusion(mq, lq, mp, lp, eps)
    (zr.sum() + klr).backward()
    for g, t in zip(got, (mq, lq, mp, lp)):
        close(g, t.grad, torch.float32)


def test_variational_rejects_bad_input():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one of eps"):
        kv.variational_fusion(a, a, a, a)
    with pytest.raises(ValueError, match="share a shape"):
        kv.variational_fusion(a, a, a, torch.zeros(2, 4), seed=0)
    with pytest.raises(ValueError, match="direction must be"):
        kv.variational_fusion(a, a, a, a, seed=0, direction="qq")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the native bf16 tensor-core path"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b,d,deterministic", [(4099, 512, False), (1000, 2048, True), (333, 1, False)]
)
def test_native_gpu_path_matches_reference(dtype, b, d, deterministic):
    x = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(14.0, device="cuda", requires_grad=True)
    assert not kc.interpreting()  # compiled and autotuned, not the interpreter
    loss = kc.contrastive_loss(x, y, s, 0.1, deterministic=deterministic)
    loss.backward()
    got = (loss.detach(), x.grad, y.grad, s.grad)
    x.grad = y.grad = s.grad = None
    ref = reference.contrastive_loss(x, y, s, 0.1)
    ref.backward()
    for g, r in zip(got, (ref.detach(), x.grad, y.grad, s.grad)):
        close(g, r, dtype, max(b, d))


def test_kernels_package_is_standalone():
    import pathlib

    for f in pathlib.Path(kc.__file__).parent.glob("*.py"):
        for line in f.read_text().splitlines():
            assert not line.lstrip().startswith(("import mmtrain", "from mmtrain")), (
                f"{f.name}: {line}"
            )


ORACLE = re.compile(
    r"^\s*(from kernels\.reference|import kernels\.reference|from kernels import .*\breference\b)",
    re.M,
)


def test_the_library_never_imports_the_test_oracle():
    """kernels/reference.py is what the kernels are tested against; models compute with
    kernels.gaussian, and each kernel has its one torch path of its own."""
    import pathlib

    root = pathlib.Path(kc.__file__).parents[1]
    users = [
        str(f.relative_to(root))
        for folder in ("mmtrain", "kernels")
        for f in (root / folder).rglob("*.py")
        if f.name not in ("reference.py", "bench.py") and ORACLE.search(f.read_text())
    ]
    assert not users, users


@pytest.fixture
def traffic(monkeypatch):
    """Bytes the interpreter's kernels load and store (masked-off elements not counted)."""
    from triton.runtime.interpreter import InterpreterBuilder

    moved = {"read": 0, "written": 0}
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def size(ptrs, mask):
        return int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8

    def counting_load(self, ptrs, mask, *rest):
        moved["read"] += size(ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def counting_store(self, ptrs, value, mask, *rest):
        moved["written"] += size(ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", counting_store)
    return moved


@interpreter_only
@pytest.mark.parametrize("seeded", [False, True])
def test_variational_step_moves_the_minimal_passes(traffic, seeded):
    n, d = 6, 300
    ins = stats((n, d), torch.bfloat16, 6)
    dz = torch.randn(n, d).to(torch.bfloat16)
    noise = dict(seed=5) if seeded else dict(eps=torch.randn(n, d).to(torch.bfloat16))
    kv.variational_fusion_step(*ins, dz, **noise)
    per_row = 4 + 4  # the incoming KL gradient read, the KL written (fp32)
    assert traffic["read"] + traffic["written"] == (10 if seeded else 11) * n * d * 2 + n * per_row
    traffic["read"] = traffic["written"] = 0
    z, kl = kv.variational_fusion(*ins, **noise)  # under autograd: z before dz
    torch.autograd.backward([z, kl], [dz, torch.ones_like(kl)])
    assert traffic["read"] + traffic["written"] == (14 if seeded else 16) * n * d * 2 + n * per_row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,direction,reduction,seeded",
    [
        ((7, 33), "qp", "mean", False),
        ((2, 5, 1030), "pq", "sum", True),
        ((1, 1), "qp", "none", False),
        ((3, 2048), "pq", "none", True),
    ],
)
def test_variational_step_equals_autograd_forward_and_backward(
    dtype, shape, direction, reduction, seeded
):
    ins = stats(shape, dtype, 7, transpose=len(shape) == 2 and shape[0] > 1)
    with torch.no_grad():
        ins[1][(0,) * len(shape)] = -45.0  # clamped: zero gradient
    dz = torch.randn(shape, generator=gen(8)).to(dtype)
    noise = dict(seed=9) if seeded else dict(eps=torch.randn(shape).to(dtype))
    kw = dict(direction=direction, reduction=reduction)
    z, kl = kv.variational_fusion(*ins, **noise, **kw)
    gkl = torch.rand(kl.shape, generator=gen(10)) + 0.5
    torch.autograd.backward([z, kl], [dz, gkl])
    zs, kls, grads = kv.variational_fusion_step(*ins, dz, **noise, grad_kl=gkl, **kw)
    assert zs.dtype == dtype and not zs.requires_grad
    torch.testing.assert_close(zs, z.detach(), rtol=0, atol=0)  # the same noise, the same z
    close(kls, kl.detach(), dtype)
    for g, t in zip(grads, ins):
        assert g.dtype == t.dtype
        close(g, t.grad, dtype)
    assert grads[1][(0,) * len(shape)] == 0


def test_variational_step_torch_fallback_agrees(monkeypatch):
    ins = stats((5, 40), torch.float32, 11)
    dz, eps = torch.randn(5, 40), torch.randn(5, 40)
    fused = kv.variational_fusion_step(*ins, dz, eps=eps, grad_kl=0.3, direction="pq")
    monkeypatch.setattr(kv, "use_triton", lambda *t: False)
    plain = kv.variational_fusion_step(*ins, dz, eps=eps, grad_kl=0.3, direction="pq")
    for a, b in zip(fused[:2] + fused[2], plain[:2] + plain[2]):
        close(a, b, torch.float32)
    with pytest.raises(ValueError, match="grad_z must have the shape of z"):
        kv.variational_fusion_step(*ins, dz[:, :3], eps=eps)


def test_deterministic_runs_one_pinned_configuration_not_the_autotuners_pick(monkeypatch):
    """On a GPU the autotuner times its configurations in each process and may pick another tile
    in another run or rank; deterministic=True launches the one PINNED configuration instead."""
    import kernels._triton as kt

    launched = []

    class Tuned:  # an autotuned kernel: indexing it runs the autotuner, .fn is the plain kernel
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(("autotuned", grid, k))

        class fn:  # noqa: N801
            def __class_getitem__(cls, grid):
                return lambda *a, **k: launched.append(("pinned", grid, k))

    monkeypatch.setattr(kt, "interpreting", lambda: False)  # as on a GPU
    kt.launch(Tuned(), (4,), (1, 2), dict(DOT_FP32=True), kc.PINNED)
    kt.launch(Tuned(), lambda meta: (100 // meta["BLOCK_M"],), (1,), {}, kc.PINNED)
    kt.launch(Tuned(), (4,), (1, 2), dict(DOT_FP32=True), None)
    assert launched[0] == ("pinned", (4,), dict(DOT_FP32=True, **kc.PINNED))
    assert launched[1][:2] == ("pinned", (100 // kc.PINNED["BLOCK_M"],))
    assert launched[2] == ("autotuned", (4,), dict(DOT_FP32=True))
    fwd = {(bm, bn, bd, w) for bm, bn, bd, w in kc.FORWARD_TILES}
    bwd = {(bm, bn, bd, w) for bm, bn, bd, w in kc.BACKWARD_TILES}
    p = kc.PINNED
    assert (p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"]) in fwd & bwd


def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_one_clear_error(monkeypatch):
    from types import SimpleNamespace

    import kernels._triton as kt

    turing = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    monkeypatch.setattr(kt, "capability", lambda device: (7, 5))
    with pytest.raises(
        ValueError, match=r"bf16 features on a GPU of compute capability 7\.5.*fp16"
    ):
        kt.check_tensor_cores(turing)
    kt.check_tensor_cores(SimpleNamespace(is_cuda=True, dtype=torch.float16, device="cuda:0"))
    monkeypatch.setattr(kt, "capability", lambda device: (8, 0))
    kt.check_tensor_cores(turing)  # Ampere: fine
