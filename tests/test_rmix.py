"""RecursiveMix and the baseline mixes: exact semantics, history, state, edge cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmix import CutMix, Mixup, NoMix, RecursiveMix, ResizeMix, build_mix, smooth_one_hot
from rmix.boxes import paste_one_box, paste_per_sample, sample_boxes


def batch(n=6, c=3, h=32, w=32, k=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _force_box(monkeypatch, box):
    import rmix.recursive_mix as rm

    monkeypatch.setattr(rm, "sample_boxes", lambda rng, ratio, h, w: np.repeat(np.asarray([box]), len(ratio), 0))
    monkeypatch.setattr(rm, "sample_box", lambda rng, ratio, h, w: tuple(box))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_fixed_box_paste_is_exact(monkeypatch, mode):
    box = (5, 9, 21, 17)  # x1, y1, x2, y2: a wide, short box, so a transposed frame would show
    _force_box(monkeypatch, box)
    mix = RecursiveMix(alpha=0.5, interpolation=mode, num_classes=10)
    x0, y0 = batch(h=32, w=40)
    first = mix(x0.clone(), y0)
    assert first.boxes is None and torch.all(first.lam == 1)
    x1, y1 = batch(h=32, w=40, seed=1)
    out = mix(x1.clone(), y1)

    x1_, y1_, x2_, y2_ = box
    expected = x1.clone()
    kw = {} if mode == "nearest" else {"align_corners": True}
    expected[:, :, y1_:y2_, x1_:x2_] = F.interpolate(x0, size=(y2_ - y1_, x2_ - x1_), mode=mode, **kw)
    assert torch.equal(out.images, expected)
    # outside the box, untouched
    mask = torch.ones(32, 40, dtype=torch.bool)
    mask[y1_:y2_, x1_:x2_] = False
    assert torch.equal(out.images[:, :, mask], x1[:, :, mask])
    # boxes in (x1, y1, x2, y2) order, per sample
    assert out.boxes.shape == (6, 4)
    assert torch.equal(out.boxes, torch.tensor(box, dtype=torch.float32).expand(6, 4))
    lam = 1 - (16 * 8) / (32 * 40)
    assert torch.allclose(out.lam, torch.full((6,), lam))
    t_expected = lam * smooth_one_hot(y1, 10) + (1 - lam) * smooth_one_hot(y0, 10)
    assert torch.allclose(out.targets, t_expected)


def test_side_ratio_statistics():
    # side = int(S * sqrt(U(0, alpha))) => (side/S)^2 ~ U(0, alpha): mean alpha/2, var alpha^2/12
    mix = RecursiveMix(alpha=0.5, seed=3)
    ratios = mix._draw_ratio(200_000)
    sq = ratios ** 2
    assert abs(sq.mean() - 0.25) < 0.003
    assert abs(sq.var() - 0.25 / 12 * 1.0) < 0.002
    assert sq.max() <= 0.5
    # the boxes: centre uniform, clipped
    boxes = sample_boxes(np.random.default_rng(0), ratios[:5000], 64, 48)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all()


def test_one_box_draw_is_the_array_draw():
    """The one-box-per-batch path draws with Python scalars; it gives the boxes, and leaves the generator in
    the state, of the (n, 4) array path it replaced (so runs and checkpoints from before reproduce)."""
    from rmix.boxes import sample_box

    for seed in range(300):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        height, width = (seed % 7) * 37 + 1, (seed % 5) * 53 + 2
        got = sample_box(a, float(np.sqrt(a.uniform(0.0, 1.0))), height, width)
        ratio = np.sqrt(b.uniform(0.0, 1.0, size=1))
        half_w, half_h = (width * ratio).astype(np.int64) // 2, (height * ratio).astype(np.int64) // 2
        cx, cy = b.integers(0, width, size=1), b.integers(0, height, size=1)
        want = (np.clip(cx - half_w, 0, width), np.clip(cy - half_h, 0, height),
                np.clip(cx + half_w, 0, width), np.clip(cy + half_h, 0, height))
        assert got == tuple(int(v[0]) for v in want)
        assert a.bit_generator.state == b.bit_generator.state


def test_batch_box_targets_are_the_float32_formula_bit_for_bit():
    """lam * y + (1 - lam) * y_old with lam as a float32 tensor, as Mix._mix_targets computes it."""
    mix = RecursiveMix(alpha=1.0, num_classes=10, smoothing=0.1, seed=4)
    x0, y0 = batch(n=8)
    mix(x0, y0)
    previous = mix._targets.clone()
    for seed in range(1, 6):
        x, y = batch(n=8, seed=seed)
        out = mix(x, y)
        lam = out.lam[:, None]
        want = lam * smooth_one_hot(y, 10, 0.1) + (1.0 - lam) * previous
        assert torch.equal(out.targets, want)
        previous = out.targets.clone()


@pytest.mark.parametrize("cls", [Mixup, CutMix])
def test_partner_mix_targets_are_the_float32_formula_bit_for_bit(cls):
    mix = cls(alpha=1.0, num_classes=10, smoothing=0.1, seed=7)
    partners = []
    draw = mix._partner
    mix._partner = lambda n, device: partners.append(draw(n, device)) or partners[-1]
    for seed in range(5):
        x, y = batch(n=8, seed=seed)
        out = mix(x, y)
        soft = smooth_one_hot(y, 10, 0.1)
        lam = out.lam[:, None]
        want = soft if out.boxes is None and cls is CutMix else lam * soft + (1.0 - lam) * soft[partners[-1]]
        assert torch.equal(out.targets, want)


@pytest.mark.parametrize("box", [None, (3, 4, 20, 21)])
def test_scalar_lam_batch_is_the_tensor_formula_on_both_routes(monkeypatch, box):
    """One lam (and box) for the batch: the compiled pass (CPU, numba) and the tensor ops both give the bits of
    ``lam * y + (1 - lam) * y_other`` with a float32 lam tensor, the repeated box and the lams (a strided
    ``other`` too)."""
    import rmix.base as base

    assert base._scalar_lam_rows is not None  # the Makefile installs numba: the compiled pass must run here
    g = torch.Generator().manual_seed(0)
    cases = []
    for trial in range(12):
        n, k = trial + 1, 2 + 3 * trial
        targets = torch.rand(n, k, generator=g)
        other = torch.rand(n, 2 * k, generator=g)[:, ::2] if trial % 3 == 0 else torch.rand(n, k, generator=g)
        lam = float(torch.rand(1, generator=g))
        cases.append((targets, other, lam))
    routes = [[base.Mix._scalar_lam_batch(t, o, lam, box) for t, o, lam in cases]]
    monkeypatch.setattr(base, "_scalar_lam_rows", None)
    routes.append([base.Mix._scalar_lam_batch(t, o, lam, box) for t, o, lam in cases])
    for got_by_route in routes:
        for (t, o, lam), (mixed, boxes, lams) in zip(cases, got_by_route):
            lam_t = torch.full((t.shape[0],), lam, dtype=torch.float32)
            assert torch.equal(mixed, base.Mix._mix_targets(t, o, lam_t))
            assert torch.equal(lams, lam_t)
            if box is None:
                assert boxes is None
            else:
                assert boxes.shape == (t.shape[0], 4) and boxes.is_contiguous()
                assert torch.equal(boxes, torch.tensor([box], dtype=torch.float32).expand(t.shape[0], 4))


@pytest.mark.parametrize("k, smoothing, dtype", [(10, 0.0, torch.int64), (1000, 0.1, torch.int32), (3000, 0.2, torch.int64)])
def test_recursive_mix_reads_labels_in_its_compiled_pass_with_the_soft_targets_bits(k, smoothing, dtype):
    """RecursiveMix on the CPU hands (N,) labels to the compiled pass that mixes the targets (the table's rows read
    there, up to 2,048 classes; soft targets first above): the same targets, boxes, lams and history as a mix
    fed the soft targets, through batch sizes that change and zero-area draws; a label out of range is one
    ValueError line, from the first call and from a mixing one."""
    import rmix.base as base

    from_labels, from_soft = (RecursiveMix(alpha=0.3, num_classes=k, smoothing=smoothing, seed=2) for _ in range(2))
    tables = []
    label_table = from_labels._label_table
    from_labels._label_table = lambda t, d: tables.append(label_table(t, d)) or tables[-1]
    calls = []
    kernel = base._scalar_lam_rows
    base._scalar_lam_rows = lambda source, rows, *a: calls.append((source.shape == (k, k), rows.dtype)) or kernel(source, rows, *a)
    try:
        for step, n in enumerate([6, 6, 4, 9, 6, 6, 6, 6]):
            x, y = batch(n=n, k=k, seed=step, dtype=torch.uint8)
            y = y.to(dtype)
            got, want = from_labels(x.clone(), y), from_soft(x.clone(), smooth_one_hot(y, k, smoothing))
            assert torch.equal(got.images, want.images) and torch.equal(got.targets, want.targets)
            assert torch.equal(got.lam, want.lam) and (got.boxes is None) == (want.boxes is None)
            assert got.boxes is None or torch.equal(got.boxes, want.boxes)
            assert got.targets.dtype == torch.float32 and got.targets.shape == (n, k)
            for m in (from_labels, from_soft):
                m.record_logits(torch.full((n, k), float(step)))
        from_table = {rows for table_rows, rows in calls if table_rows}  # the compiled pass read the labels themselves
        with pytest.raises(ValueError, match=rf"labels must be in 0..{k - 1}, got 0..{k}"):
            from_labels(*batch(n=6, k=1, seed=9, dtype=torch.uint8)[:1], torch.tensor([0, 1, 2, 3, 4, k]))
        from_labels.reset()
        with pytest.raises(ValueError, match=rf"labels must be in 0..{k - 1}, got -1..1"):
            from_labels(*batch(n=3, k=1, seed=9, dtype=torch.uint8)[:1], torch.tensor([0, -1, 1]))
    finally:
        base._scalar_lam_rows = kernel
    assert any(t is not None for t in tables) == (k <= 2048)  # the label route ran where it can
    assert from_table == ({np.dtype(str(dtype).split(".")[1])} if k <= 2048 else set())


def test_smooth_one_hot_rows_from_the_table_and_from_scatter(monkeypatch):
    """Soft targets are one row lookup in a cached table up to 2,048 classes, a fill and scatter above: the same
    float32 values either way (1 - smoothing on the label, smoothing / (K - 1) elsewhere); bad labels fail."""
    import rmix.batch as rb

    g = torch.Generator().manual_seed(1)
    for k, smoothing in ((2, 0.0), (10, 0.1), (1000, 0.3), (3000, 0.2)):
        y = torch.randint(0, k, (300,), generator=g)
        for labels in (y, y.int()):
            got = smooth_one_hot(labels, k, smoothing)
            assert got.shape == (300, k) and got.dtype == torch.float32
            on = torch.tensor(1.0 - smoothing, dtype=torch.float32)
            off = torch.tensor(smoothing / (k - 1), dtype=torch.float32)
            assert torch.equal(got.gather(1, y[:, None])[:, 0], on.expand(300))
            assert int((got == off).sum()) == 300 * (k - 1) if smoothing else int((got == 0).sum()) == 300 * (k - 1)
        assert ((k, smoothing, y.device) in rb._TABLES) == (k <= rb._TABLE_MAX_CLASSES)
    monkeypatch.setattr(rb, "_TABLE_MAX_CLASSES", 5)
    y = torch.randint(0, 10, (50,), generator=g)
    assert torch.equal(smooth_one_hot(y, 10, 0.05), rb._fill_and_scatter(y, 10, 0.05))
    assert (10, 0.05, y.device) not in rb._TABLES
    monkeypatch.undo()
    for bad, k in ((torch.tensor([3, 10]), 10), (torch.tensor([-1, 2]), 10), (torch.tensor([3000]), 3000)):
        with pytest.raises(ValueError, match=rf"labels must be in 0..{k - 1}, got {int(bad.min())}..{int(bad.max())}"):
            smooth_one_hot(bad, k)


def test_history_is_previous_mixed_output():
    mix = RecursiveMix(alpha=1.0, num_classes=10, seed=1)
    xs = [batch(seed=s) for s in range(4)]
    outs = []
    for x, y in xs:
        b = mix(x.clone(), y)
        outs.append((b.images.clone(), b.targets.clone()))
        mix.record_logits(torch.randn(6, 10))
    # the history now equals the last *mixed* output, which itself holds content of earlier steps
    assert torch.equal(mix._images, outs[-1][0])
    assert torch.equal(mix._targets, outs[-1][1])

    # replay step 3 by hand: paste outs[1] (mixed, not raw xs[1]) into raw xs[2]
    replay = RecursiveMix(alpha=1.0, num_classes=10, seed=1)
    replay(xs[0][0].clone(), xs[0][1])
    replay(xs[1][0].clone(), xs[1][1])
    assert torch.equal(replay._images, outs[1][0])
    b = replay(xs[2][0].clone(), xs[2][1])
    x1, y1, x2, y2 = (int(v) for v in b.boxes[0])
    pasted = F.interpolate(outs[1][0], size=(y2 - y1, x2 - x1), mode="nearest")
    assert torch.equal(b.images[:, :, y1:y2, x1:x2], pasted)
    assert torch.allclose(b.targets, b.lam[:, None] * smooth_one_hot(xs[2][1], 10) + (1 - b.lam[:, None]) * outs[1][1])


def test_reset_and_epochs():
    mix = RecursiveMix(num_classes=10)
    mix(*batch())
    assert mix.has_history
    mix.set_epoch(1)
    assert not mix.has_history
    b = mix(*batch(seed=2))
    assert b.boxes is None and torch.all(b.lam == 1)

    keep = RecursiveMix(num_classes=10, keep_history_across_epochs=True)
    keep(*batch())
    keep.set_epoch(1)
    assert keep.has_history


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_state_dict_round_trip_is_bit_exact(box):
    a = RecursiveMix(alpha=0.7, box=box, num_classes=10, seed=11)
    for s in range(3):
        a(*batch(seed=s))
        a.record_logits(torch.randn(6, 10, generator=torch.Generator().manual_seed(s)))
    state = a.state_dict()
    blob = __import__("io").BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    b = RecursiveMix(alpha=0.7, box=box, num_classes=10, seed=999)
    b.load_state_dict(torch.load(blob, weights_only=False))
    for s in range(3, 6):
        x, y = batch(seed=s)
        ra, rb = a(x.clone(), y), b(x.clone(), y)
        assert torch.equal(ra.images, rb.images)
        assert torch.equal(ra.targets, rb.targets)
        assert torch.equal(ra.boxes, rb.boxes)
        assert torch.equal(ra.history_logits, rb.history_logits)
        logits = torch.randn(6, 10)
        a.record_logits(logits)
        b.record_logits(logits)


@pytest.mark.parametrize("alpha", [1.0, 0.001])
def test_planned_paste_gives_the_plain_calls_batches_and_guards_its_draw(alpha):
    """plan_paste + the caller's own paste + mix(pasted=plan) is an ordinary call, bit for bit (batch sizes that
    change, zero-area draws at alpha 0.001); a plan is refused where the next call must do its own work, and a
    plan that is skipped or stale is an error instead of a silently different box sequence."""
    plain, planned = (RecursiveMix(alpha=alpha, num_classes=10, seed=4) for _ in range(2))
    assert planned.plan_paste((6, 3, 32, 32), torch.uint8, torch.device("cpu")) is None  # no history yet
    used = 0
    for step, n in enumerate([6, 6, 4, 6, 8, 6, 6]):
        x, y = batch(n=n, seed=step, dtype=torch.uint8)
        want = plain(x.clone(), y)
        plan = planned.plan_paste(x.shape, x.dtype, x.device)
        mine = x.clone()
        if plan is not None:
            plan.apply(mine)
            used += 1
        got = planned(mine, y, pasted=plan)
        assert torch.equal(got.images, want.images) and torch.equal(got.targets, want.targets)
        assert torch.equal(got.lam, want.lam) and (got.boxes is None) == (want.boxes is None)
        assert got.boxes is None or torch.equal(got.boxes, want.boxes)
        for m in (plain, planned):
            m.record_logits(torch.randn(n, 10))
    assert used == 6 and (alpha == 1.0) == (want.boxes is not None)
    x, y = batch(dtype=torch.uint8)
    cpu = torch.device("cpu")
    for other in (RecursiveMix(box="sample"), RecursiveMix(interpolation="bilinear")):
        other(x.clone(), y.float().new_zeros(6, 10))
        assert other.plan_paste(x.shape, x.dtype, cpu) is None
    assert planned.plan_paste(x.shape, torch.float32, cpu) is None  # the history is uint8
    plan = planned.plan_paste(x.shape, x.dtype, cpu)
    with pytest.raises(RuntimeError, match="pass its plan"):
        planned(x.clone(), y)
    stale = planned.plan_paste(x.shape, x.dtype, cpu)
    planned.plan_paste(x.shape, x.dtype, cpu)  # replaces the unused one
    with pytest.raises(RuntimeError, match="returned last"):
        planned(x.clone(), y, pasted=stale)
    planned.load_state_dict(plain.state_dict())  # a restored mix has no plan pending
    assert planned(x.clone(), y).images.shape == x.shape and plan is not None


def test_state_dict_rejects_other_config():
    a = RecursiveMix(alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        RecursiveMix(alpha=0.3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="mix"):
        CutMix(1.0).load_state_dict(a.state_dict())


def test_per_sample_boxes_differ_and_match_interpolate():
    mix = RecursiveMix(alpha=1.0, box="sample", num_classes=10, seed=5)
    x0, y0 = batch(n=16)
    mix(x0.clone(), y0)
    x1, y1 = batch(n=16, seed=1)
    b = mix(x1.clone(), y1)
    assert len({tuple(r.tolist()) for r in b.boxes}) > 8
    for i in range(16):
        bx1, by1, bx2, by2 = (int(v) for v in b.boxes[i])
        exp = x1[i].clone()
        if bx2 > bx1 and by2 > by1:
            exp[:, by1:by2, bx1:bx2] = F.interpolate(x0[i : i + 1], size=(by2 - by1, bx2 - bx1), mode="nearest")[0]
        assert torch.equal(b.images[i], exp), i
        area = (bx2 - bx1) * (by2 - by1)
        assert b.lam[i].item() == pytest.approx(1 - area / 1024)


def test_per_sample_bilinear_close_to_interpolate():
    dst = torch.zeros(3, 3, 20, 24)
    src = torch.rand(3, 3, 20, 24)
    boxes = np.array([[2, 3, 12, 17], [0, 0, 24, 20], [5, 5, 6, 9]])
    paste_per_sample(dst, src, boxes, "bilinear")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ref = torch.zeros(3, 20, 24)
        ref[:, y1:y2, x1:x2] = F.interpolate(src[i : i + 1], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=True)[0]
        assert torch.allclose(dst[i], ref, atol=1e-5)


def test_batch_size_changes():
    mix = RecursiveMix(alpha=1.0, num_classes=10, seed=2)
    mix(*batch(n=8))
    mix.record_logits(torch.arange(80.0).view(8, 10))
    small = mix(*batch(n=3, seed=1))  # smaller: first rows of the history
    assert small.images.shape[0] == 3 and small.targets.shape == (3, 10)
    assert torch.equal(small.history_logits, torch.arange(30.0).view(3, 10))
    mix.record_logits(torch.arange(30.0).view(3, 10))
    big = mix(*batch(n=7, seed=2))  # larger: history row i % 3
    assert big.images.shape[0] == 7 and big.targets.shape == (7, 10)
    assert torch.equal(big.history_logits, torch.arange(30.0).view(3, 10)[torch.arange(7) % 3])
    with pytest.raises(ValueError, match="logits for"):
        mix.record_logits(torch.randn(3, 10))


def test_zero_area_box_is_a_noop(monkeypatch):
    _force_box(monkeypatch, (7, 7, 7, 12))
    mix = RecursiveMix(num_classes=10)
    mix(*batch())
    x, y = batch(seed=1)
    b = mix(x.clone(), y)
    assert b.boxes is None
    assert torch.equal(b.images, x)
    assert torch.equal(b.targets, smooth_one_hot(y, 10))
    assert not torch.isnan(b.targets).any()


@pytest.mark.parametrize("alpha", [1e-6, 1.0])
def test_alpha_extremes(alpha):
    mix = RecursiveMix(alpha=alpha, num_classes=10, seed=0)
    mix(*batch())
    for s in range(20):
        b = mix(*batch(seed=s))
        assert torch.isfinite(b.targets).all() and torch.allclose(b.targets.sum(1), torch.ones(6))
        assert ((b.lam >= 0) & (b.lam <= 1)).all()
        if alpha < 1e-3:
            assert b.boxes is None  # sqrt(1e-6) * 32 < 1 pixel
    with pytest.raises(ValueError):
        RecursiveMix(alpha=0.0)
    with pytest.raises(ValueError):
        RecursiveMix(alpha=1.5)


@pytest.mark.parametrize("box", ["batch", "sample"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_uint8_and_channels_last(box, mode):
    mix = RecursiveMix(alpha=1.0, box=box, interpolation=mode, num_classes=10, seed=4)
    x0, y0 = batch(dtype=torch.uint8)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    mix(x0.clone(memory_format=torch.preserve_format), y0)
    x1, y1 = batch(dtype=torch.uint8, seed=1)
    x1 = x1.contiguous(memory_format=torch.channels_last)
    b = mix(x1.clone(memory_format=torch.preserve_format), y1)
    assert b.images.dtype == torch.uint8
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.boxes is not None
    # inside each box: the whole history image resized into it; outside: the batch untouched
    for i in range(x1.shape[0]):
        bx1, by1, bx2, by2 = (int(v) for v in b.boxes[i])
        if bx2 <= bx1 or by2 <= by1:
            continue
        kw = {"align_corners": True} if mode == "bilinear" else {}
        ref = F.interpolate(x0[i : i + 1].float(), size=(by2 - by1, bx2 - bx1), mode=mode, **kw)[0]
        region = b.images[i, :, by1:by2, bx1:bx2].float()
        assert (region - ref).abs().max() <= (0 if mode == "nearest" else 1), (i, mode)
        outside = torch.ones_like(x1[i], dtype=torch.bool)
        outside[:, by1:by2, bx1:bx2] = False
        assert torch.equal(b.images[i][outside], x1[i][outside])


def test_soft_targets_accepted_and_int_labels_need_classes():
    mix = RecursiveMix()
    x, y = batch()
    with pytest.raises(ValueError, match="num_classes"):
        mix(x, y)
    b = mix(x, smooth_one_hot(y, 10, 0.1))
    assert torch.allclose(b.targets.sum(1), torch.ones(6))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        mix(x[0], y)


@pytest.mark.parametrize("cls", [Mixup, CutMix, ResizeMix])
def test_baselines_signature_and_label_mass(cls):
    mix = cls(alpha=1.0, num_classes=10, seed=0)
    for s in range(10):
        x, y = batch(seed=s)
        b = mix(x.clone(), y)
        assert b.images.shape == x.shape and b.targets.shape == (6, 10)
        assert torch.allclose(b.targets.sum(1), torch.ones(6))
        assert ((b.lam > 0) & (b.lam <= 1)).all()
    state = mix.state_dict()
    x, y = batch(seed=99)
    r1 = mix(x.clone(), y)
    mix.load_state_dict(state)
    r2 = mix(x.clone(), y)
    assert torch.equal(r1.images, r2.images) and torch.equal(r1.targets, r2.targets)


def test_cutmix_pastes_partner_pixels():
    mix = CutMix(alpha=1.0, num_classes=10, seed=1)
    partners = []
    draw = mix._partner
    mix._partner = lambda n, device: partners.append(draw(n, device)) or partners[-1]
    x, y = batch(n=5)
    b = mix(x.clone(), y)
    assert b.boxes is not None
    x1, y1, x2, y2 = (int(v) for v in b.boxes[0])
    # image i holds its partner's patch inside the box and its own pixels outside
    want = x.clone()
    want[:, :, y1:y2, x1:x2] = x[partners[0], :, y1:y2, x1:x2]
    assert torch.equal(b.images, want) and not torch.equal(b.images, x)
    lam = 1 - (x2 - x1) * (y2 - y1) / 1024
    assert torch.allclose(b.lam, torch.full((5,), lam))


def test_cutmix_on_a_channels_last_batch_is_the_contiguous_result():
    """DALI's host crop hands over channels-last uint8 batches: CutMix pastes them in their memory order, with
    the same pixels, targets and box as on the contiguous batch, and the batch stays channels last."""
    x, y = batch(n=8, h=24, w=40, dtype=torch.uint8)
    plain = CutMix(1.0, num_classes=10, seed=3)(x.clone(), y)
    last = x.contiguous(memory_format=torch.channels_last)
    got = CutMix(1.0, num_classes=10, seed=3)(last, y)
    assert got.images.is_contiguous(memory_format=torch.channels_last) and not got.images.is_contiguous()
    assert torch.equal(got.images, plain.images) and torch.equal(got.targets, plain.targets)
    assert torch.equal(got.boxes, plain.boxes) and not torch.equal(plain.images, x)


def test_nomix_and_registry():
    x, y = batch()
    b = build_mix("none", num_classes=10, alpha=0.5)(x, y)
    assert b.boxes is None and torch.equal(b.images, x) and torch.all(b.lam == 1)
    rm = build_mix("recursive_mix", alpha=0.5, num_classes=10)
    assert type(rm) is RecursiveMix and rm.alpha == 0.5 and rm.uses_logits
    assert not NoMix().uses_logits and not CutMix(1.0).uses_logits
    # the loader contract: a mix that keeps history may borrow the batch instead of copying it
    assert rm.copy_history
    rm.borrow_batches()
    assert not rm.copy_history
    xb = x.clone()
    rm(xb, y)
    assert rm._images.data_ptr() == xb.data_ptr()  # a reference to the same memory, not a copy
    with pytest.raises(ValueError, match="unknown mix"):
        build_mix("fmix")


def test_paste_one_box_uint8_bilinear_rounds():
    dst = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    src = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)
    paste_one_box(dst, src, np.array([0, 0, 3, 3]), "bilinear")
    assert dst[0, 0, 1, 1].item() == 128  # centre of a 0/255 checkerboard, rounded


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_reference_history_equals_copied_history(box):
    """copy_history=False (what our loaders use) mixes exactly like the copying default."""
    a = RecursiveMix(alpha=1.0, box=box, num_classes=10, seed=3)
    b = RecursiveMix(alpha=1.0, box=box, num_classes=10, seed=3, copy_history=False)
    for s in range(4):
        x, y = batch(seed=s)
        ra, rb = a(x.clone(), y), b(x.clone(), y)
        assert torch.equal(ra.images, rb.images) and torch.equal(ra.targets, rb.targets)
        logits = torch.randn(6, 10)
        a.record_logits(logits)
        b.record_logits(logits)
    assert torch.equal(a.state_dict()["images"], b.state_dict()["images"])


@pytest.mark.gpu
@pytest.mark.parametrize("box", ["batch", "sample"])
def test_recursive_mix_on_cuda_matches_cpu(box):
    """The device follows the input: the same draws give the same mix on CUDA as on CPU."""
    cpu = RecursiveMix(alpha=1.0, box=box, num_classes=10, seed=2)
    gpu = RecursiveMix(alpha=1.0, box=box, num_classes=10, seed=2)
    for s in range(3):
        x, y = batch(seed=s)
        rc, rg = cpu(x.clone(), y), gpu(x.clone().cuda(), y.cuda())
        assert rg.images.is_cuda and rg.targets.is_cuda
        assert torch.equal(rc.images, rg.images.cpu()) and torch.allclose(rc.targets, rg.targets.cpu())
        logits = torch.randn(6, 10)
        cpu.record_logits(logits)
        gpu.record_logits(logits.cuda())


@pytest.mark.parametrize("cls, kw, exact", [(RecursiveMix, {}, True), (RecursiveMix, {"interpolation": "bilinear"}, False),
                                             (CutMix, {"alpha": 1.0}, True), (Mixup, {"alpha": 1.0}, False),
                                             (ResizeMix, {}, True), (NoMix, {}, True)])
def test_exact_on_uint8_means_mixing_commutes_with_normalisation(cls, kw, exact):
    """A mix that declares exact_on_uint8 gives the same float batch whether it mixes the uint8 batch
    and normalisation follows, or normalisation comes first (what a loader relies on)."""
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)
    a, b = cls(num_classes=10, seed=5, **kw), cls(num_classes=10, seed=5, **kw)
    assert a.exact_on_uint8 == exact
    same = True
    for s in range(4):
        x, y = batch(dtype=torch.uint8, seed=s)
        u8_first = (a(x.clone(), y).images.float() - mean) / std
        f_first = b((x.float() - mean) / std, y).images
        same &= torch.equal(u8_first, f_first)
        for m in (a, b):
            if m.uses_logits:
                m.record_logits(torch.zeros(6, 10))
    assert same == exact


def _cpu_has_ssse3() -> bool:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " ssse3 " in f" {open('/proc/cpuinfo').read().replace(chr(10), ' ')} "
    except OSError:
        return False


@pytest.mark.parametrize("kernel", ["shuffle", "numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size,box", [((40, 48), (3, 5, 30, 39)), ((160, 224), (10, 7, 200, 150)),
                                      ((32, 32), (0, 0, 32, 32)), ((64, 80), (70, 2, 80, 3))])
def test_nearest_paste_equals_interpolate_on_every_path(size, box, dtype, kernel, monkeypatch):
    """paste_one_box, nearest: the byte-shuffle kernel (uint8, x86-64), numba's scalar one-pass kernel on
    the CPU, and torch's paths without numba (numpy's take for wide uint8 boxes, index_select for narrow
    ones, F.interpolate for float) are all F.interpolate(mode='nearest') of the whole source written into
    the box, bit for bit, in any memory format; pixels outside the box are untouched."""
    from rmix import boxes, byte_shuffle

    if kernel == "shuffle":
        if not _cpu_has_ssse3():
            pytest.skip("the byte-shuffle kernel needs an x86-64 CPU with SSSE3")
        assert byte_shuffle.AVAILABLE  # the Makefile installs numba: on this CPU the shuffles must run
    else:
        monkeypatch.setattr(byte_shuffle, "AVAILABLE", False)
    if kernel == "torch":
        monkeypatch.setattr(boxes, "_paste_nearest", None)
    else:
        assert boxes._paste_nearest is not None  # the Makefile installs numba: this path must run
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=g).to(dtype)
    for fmt in (torch.contiguous_format, torch.channels_last):
        dst = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=g).to(dtype)
        dst = dst.contiguous(memory_format=fmt)
        want = dst.clone()
        x1, y1, x2, y2 = box
        want[:, :, y1:y2, x1:x2] = torch.nn.functional.interpolate(src, size=(y2 - y1, x2 - x1), mode="nearest")
        boxes.paste_one_box(dst, src, np.array(box), "nearest")
        assert torch.equal(dst, want), fmt


@pytest.mark.skipif(not _cpu_has_ssse3(), reason="the byte-shuffle kernel needs an x86-64 CPU with SSSE3")
def test_byte_shuffle_paste_equals_interpolate_on_random_geometries(monkeypatch):
    """The byte-shuffle plan on boxes of every kind: narrower than 16 pixels (one chunk that keeps the pixels
    beside the box, at the right edge too), a last chunk that overlaps its neighbour, downscales that need
    from 1 to 16 source windows per chunk, sources narrower and wider than the destination; and a history
    batch big enough for the prefetching branch. Each is F.interpolate(mode='nearest') written into the box,
    bit for bit, and the kernel really ran (the scalar kernels are disabled)."""
    from rmix import boxes, byte_shuffle

    assert byte_shuffle.AVAILABLE
    monkeypatch.setattr(boxes, "_paste_nearest", None)  # so a fallback would take torch's path ...
    ran = []
    real = byte_shuffle.paste
    monkeypatch.setattr(byte_shuffle, "paste", lambda d, *a: (ran.append(d.shape[0]), real(d, *a)))  # counted

    rng = np.random.default_rng(7)
    shapes = [((2, 3, 32, 32), (32, 32)), ((2, 3, 40, 16), (40, 16)), ((2, 3, 24, 200), (30, 17)),
              ((2, 3, 50, 20), (60, 300)), ((1, 2, 9, 33), (5, 40))]
    for trial in range(250):
        (n, c, h, w), (ih, iw) = shapes[trial % len(shapes)]
        src = torch.from_numpy(rng.integers(0, 256, (n, c, ih, iw), dtype=np.uint8))
        dst = torch.from_numpy(rng.integers(0, 256, (n, c, h, w), dtype=np.uint8))
        bw = int(rng.integers(1, w + 1)) if trial % 3 else int(rng.integers(1, min(w, 15) + 1))
        bh = int(rng.integers(1, h + 1))
        x1 = int(rng.integers(0, w - bw + 1)) if trial % 4 else w - bw  # every fourth box at the right edge
        y1 = int(rng.integers(0, h - bh + 1))
        want = dst.clone()
        want[:, :, y1:y1 + bh, x1:x1 + bw] = torch.nn.functional.interpolate(src, size=(bh, bw), mode="nearest")
        boxes.paste_one_box(dst, src, (x1, y1, x1 + bw, y1 + bh), "nearest")
        assert torch.equal(dst, want), (trial, (n, c, h, w), (ih, iw), (x1, y1, bw, bh))
    # beyond PREFETCH_FROM_BYTES: the rows ahead are prefetched (hints only: the result must not change)
    big = (2, 3, 800, 1088)
    assert np.prod(big) >= byte_shuffle.PREFETCH_FROM_BYTES
    src = torch.from_numpy(rng.integers(0, 256, big, dtype=np.uint8))
    for box in [(200, 150, 744, 550), (0, 0, 1088, 800), (1000, 790, 1088, 800), (5, 3, 400, 700)]:
        dst = torch.from_numpy(rng.integers(0, 256, big, dtype=np.uint8))
        want = dst.clone()
        x1, y1, x2, y2 = box
        want[:, :, y1:y2, x1:x2] = torch.nn.functional.interpolate(src, size=(y2 - y1, x2 - x1), mode="nearest")
        boxes.paste_one_box(dst, src, box, "nearest")
        assert torch.equal(dst, want), box
    assert sum(ran) == sum(shapes[t % len(shapes)][0][0] for t in range(250)) + 4 * big[0]  # every sample, once


def test_over_batch_covers_the_batch_once_in_the_callers_threads(monkeypatch):
    """over_batch splits range(n) into contiguous chunks, one per intra-op thread (torch.get_num_threads()),
    each exactly once, only when the work is large enough; a kernel's exception reaches the caller."""
    import threading

    from rmix import host_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    seen, where = [], {}

    def kernel(a, b):
        seen.append((a, b))
        where[a] = threading.current_thread()

    host_threads.over_batch(kernel, 10, nbytes=10 * host_threads.MIN_CHUNK_BYTES)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 10)]
    assert where[0] is threading.current_thread()  # the first chunk in the caller, the others in the pool
    assert all(where[a].name.startswith("rmix-host") for a in (3, 6))
    seen.clear()
    host_threads.over_batch(kernel, 10, nbytes=host_threads.MIN_CHUNK_BYTES)  # too little work to split
    assert seen == [(0, 10)]
    seen.clear()
    host_threads.over_batch(kernel, 2, nbytes=10 * host_threads.MIN_CHUNK_BYTES)  # never more chunks than rows
    assert sorted(seen) == [(0, 1), (1, 2)]
    seen.clear()
    host_threads.over_batch(kernel, 10, nbytes=5 << 20, min_chunk_bytes=2 << 20)  # a kernel's own threshold
    assert sorted(seen) == [(0, 5), (5, 10)]

    def boom(a, b):
        if a > 0:
            raise ValueError("chunk failed")

    with pytest.raises(ValueError, match="chunk failed"):
        host_threads.over_batch(boom, 10, nbytes=10 * host_threads.MIN_CHUNK_BYTES)
