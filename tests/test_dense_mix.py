"""Dense RecursiveMix (rmix/dense.py) and its mmdet / mmseg integration (trainers/mm/dense_mix.py).

Exact arithmetic on hand-computed cases (paste boxes are fixed by replacing the mix's ``_draw``), the
history being the previous *mixed* batch, epochs, batch-size changes, bit-for-bit resume; then the mmdet
``batch_augments`` module and the mmseg preprocessor inside real data preprocessors on the tiny COCO /
ADE20K fixtures, and (slow) a few ATSS and UPerNet iterations on CPU with dense RM switched on.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmix import DENSE_MIXES, MIXES, DenseMixed, DetRecursiveMix, RecursiveMix, SegRecursiveMix

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "mm" / "configs"
ATSS_DENSRM = CONFIGS / "atss_r50_fpn_1x_coco_densrm.py"
UPERNET_DENSRM = CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512_densrm.py"


def fix_boxes(mix, *boxes):
    """Make the mix paste into these (x1, y1, x2, y2) boxes on its next calls, one per call (each a box
    for the whole batch, or a list of per-sample boxes); the generator is not touched."""
    queue = [np.asarray(b, dtype=np.int64).reshape(-1, 4) for b in boxes]

    def draw(n, height, width):
        b = queue.pop(0)
        return np.repeat(b, n, axis=0) if b.shape[0] == 1 else b

    mix._draw = draw


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def labels(*v):
    return torch.tensor(v, dtype=torch.int64)


# -- detection: exact arithmetic --------------------------------------------------------------------

def _history_batch():
    """2 x 3 x 8 x 8 float history, distinct values, with its boxes and labels."""
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    boxes = [t([[0, 0, 8, 8], [2, 4, 6, 8]]), t([[0, 0, 2, 2], [0, 0, 1, 1]])]
    return images, boxes, [labels(5, 6), labels(1, 2)]


CURRENT = [  # sample 0's boxes against the paste (4, 0, 8, 4); see test_det_hand_computed
    [0, 0, 4, 8],   # a: untouched
    [2, 0, 6, 4],   # b: paste covers its right half over its full height -> x2 = 4, visible 0.5
    [5, 1, 7, 3],   # c: inside the paste -> dropped
    [3, 2, 7, 6],   # d: corner covered, visible 10/16 -> kept unchanged
    [4, 2, 8, 5],   # e: top band covered (full width), visible 4/12 = 0.333 -> y1 = 4
    [4, 1, 8, 5],   # f: top band covered, visible 4/16 = 0.25 < 0.3 -> dropped
]


def _det_second_call(**kw):
    mix = DetRecursiveMix(alpha=0.5, **kw)
    h_img, h_boxes, h_labels = _history_batch()
    first = mix(h_img.clone(), h_boxes, h_labels)
    assert first.mix_boxes is None and torch.equal(first.lam, torch.ones(2))
    fix_boxes(mix, [4, 0, 8, 4])
    cur = -torch.ones(2, 3, 8, 8)
    out = mix(cur, [t(CURRENT), torch.zeros(0, 4)], [labels(10, 11, 12, 13, 14, 15), labels()])
    return mix, h_img, out


def test_det_hand_computed():
    mix, h_img, out = _det_second_call()
    assert isinstance(out, DenseMixed)
    # pixels: the 8x8 history halved (nearest: rows/cols 0, 2, 4, 6) into rows 0:4, cols 4:8
    expect = -torch.ones(2, 3, 8, 8)
    expect[:, :, 0:4, 4:8] = h_img[:, :, ::2, ::2]
    assert torch.equal(out.images, expect)
    assert torch.equal(out.mix_boxes, t([[4, 0, 8, 4]] * 2))
    assert torch.equal(out.lam, t([0.75, 0.75]))
    # sample 0: kept current boxes (a, b clipped, d, e clipped), then the history's scaled by 1/2, offset (4, 0)
    assert torch.equal(out.boxes[0], t([[0, 0, 4, 8], [2, 0, 4, 4], [3, 2, 7, 6], [4, 4, 8, 5],
                                        [4, 0, 8, 4], [5, 2, 7, 4]]))
    assert torch.equal(out.labels[0], labels(10, 11, 13, 14, 5, 6))
    # sample 1: no boxes of its own; history [0,0,2,2] -> [4,0,5,1] kept, [0,0,1,1] -> 0.5 px < min_size: dropped
    assert torch.equal(out.boxes[1], t([[4, 0, 5, 1]]))
    assert torch.equal(out.labels[1], labels(1))
    assert out.labels[0].dtype == torch.int64 and out.boxes[0].dtype == torch.float32


def test_det_visibility_threshold_and_clip_mode_are_parameters():
    _, _, out = _det_second_call(min_visible=0.2)  # f (visible 0.25) now survives, clipped to y1 = 4
    assert torch.equal(out.labels[0], labels(10, 11, 13, 14, 15, 5, 6))
    assert torch.equal(out.boxes[0][4], t([4, 4, 8, 5]))
    _, _, out = _det_second_call(min_visible=0.5)  # e (0.333) dropped too; b (0.5) kept
    assert torch.equal(out.labels[0], labels(10, 11, 13, 5, 6))
    _, _, out = _det_second_call(clip="none")  # kept boxes never move
    assert torch.equal(out.boxes[0][:4], t([CURRENT[0], CURRENT[1], CURRENT[3], CURRENT[4]]))
    _, _, out = _det_second_call(min_size=0.5)  # the 0.5 px history box survives
    assert torch.equal(out.boxes[1], t([[4, 0, 5, 1], [4, 0, 4.5, 0.5]]))
    _, _, out = _det_second_call(min_visible=0.0)  # only fully covered c goes
    assert torch.equal(out.labels[0], labels(10, 11, 13, 14, 15, 5, 6))


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_det_random_batches_equal_a_per_sample_reference(box):
    """Many samples with 0-6 boxes each, over several steps: each sample's output is, in order, its kept
    current boxes (visible fraction >= min_visible and > 0) and then its history sample's boxes scaled into the
    paste, clipped to it and kept when at least min_size wide and high -- computed here one sample at a time,
    so the batched gather and per-sample split of the mix are checked against an independent loop."""
    rng = np.random.default_rng(3)
    height, width, min_visible, min_size = 48, 64, 0.4, 2.0
    mix = DetRecursiveMix(alpha=0.8, box=box, min_visible=min_visible, min_size=min_size, clip="none", seed=5)
    prev = None
    for step in range(6):
        n = 5
        boxes, labs = [], []
        for _ in range(n):
            k = int(rng.integers(0, 7))
            x1, y1 = rng.uniform(0, width - 4, k), rng.uniform(0, height - 4, k)
            b = np.stack([x1, y1, x1 + rng.uniform(0, 24, k), y1 + rng.uniform(0, 24, k)], 1).reshape(k, 4)
            boxes.append(torch.tensor(b, dtype=torch.float32))
            labs.append(torch.from_numpy(rng.integers(0, 9, k)))
        out = mix(torch.zeros(n, 3, height, width), [b.clone() for b in boxes], [l.clone() for l in labs])
        if prev is None:
            assert out.mix_boxes is None
        else:
            for i in range(n):
                px1, py1, px2, py2 = (float(v) for v in out.mix_boxes[i])
                want_b, want_l = [], []
                for b, l in zip(boxes[i].tolist(), labs[i].tolist()):
                    area = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
                    inter = max(min(b[2], px2) - max(b[0], px1), 0) * max(min(b[3], py2) - max(b[1], py1), 0)
                    visible = 1 - inter / area if area > 0 else float(not (px1 <= b[0] and b[2] <= px2
                                                                           and py1 <= b[1] and b[3] <= py2))
                    if visible > 0 and visible >= min_visible:
                        want_b.append(b)
                        want_l.append(l)
                sx, sy = (px2 - px1) / width, (py2 - py1) / height
                for b, l in zip(prev.boxes[i].tolist(), prev.labels[i].tolist()):
                    q = [min(max(b[0] * sx + px1, px1), px2), min(max(b[1] * sy + py1, py1), py2),
                         min(max(b[2] * sx + px1, px1), px2), min(max(b[3] * sy + py1, py1), py2)]
                    if q[2] - q[0] >= min_size and q[3] - q[1] >= min_size and px2 > px1 and py2 > py1:
                        want_b.append(q)
                        want_l.append(l)
                assert out.labels[i].tolist() == want_l, (step, i)
                assert torch.allclose(out.boxes[i], torch.tensor(want_b, dtype=torch.float32).reshape(-1, 4),
                                      atol=1e-4), (step, i)
        prev = out


def test_det_clip_each_side_band():
    """The paste spans the box's full extent on one axis and covers one edge: that side moves."""
    mix = DetRecursiveMix(min_visible=0.0)
    box = [2.0, 2.0, 6.0, 6.0]
    mix(torch.zeros(1, 3, 8, 8), [torch.zeros(0, 4)], [labels()])
    cases = {(0, 0, 3, 8): [3, 2, 6, 6], (5, 0, 8, 8): [2, 2, 5, 6], (0, 1, 8, 3): [2, 3, 6, 6],
             (0, 5, 8, 7): [2, 2, 6, 5], (3, 0, 5, 8): box, (0, 0, 4, 4): box, (3, 3, 5, 5): box}
    fix_boxes(mix, *cases)
    for paste, expect in cases.items():
        out = mix(torch.zeros(1, 3, 8, 8), [t([box])], [labels(3)])
        assert torch.equal(out.boxes[0][0], t(expect)), (paste, out.boxes[0])


def test_det_history_is_the_previous_mixed_batch_and_batch_size_changes():
    mix, _, second = _det_second_call()
    mixed_images = second.images.clone()
    # a full-image paste at scale 1 reproduces the history exactly: pixels, boxes, labels; every current
    # box is covered. Three samples after two: sample 2 takes history row 0.
    fix_boxes(mix, [0, 0, 8, 8])
    cur = torch.full((3, 3, 8, 8), 7.0)
    out = mix(cur, [t([[1, 1, 3, 3]]), torch.zeros(0, 4), t([[0, 0, 8, 8]])], [labels(9), labels(), labels(9)])
    assert torch.equal(out.images, mixed_images[[0, 1, 0]])
    assert torch.equal(out.lam, torch.zeros(3))
    for got, want in zip(out.boxes, [second.boxes[0], second.boxes[1], second.boxes[0]]):
        assert torch.equal(got, want)
    for got, want in zip(out.labels, [second.labels[0], second.labels[1], second.labels[0]]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("min_size", [1.0, 0.0])
def test_det_per_sample_boxes_and_zero_area(min_size):
    """min_size=0: the empty paste of sample 1 still appends none of its history's boxes."""
    mix = DetRecursiveMix(box="sample", min_size=min_size)
    h_img, h_boxes, h_labels = _history_batch()
    mix(h_img.clone(), h_boxes, h_labels)
    fix_boxes(mix, [[4, 0, 8, 4], [3, 3, 3, 5]])  # sample 1's box has zero width: nothing pasted there
    out = mix(torch.zeros(2, 3, 8, 8), [torch.zeros(0, 4), t([[3, 3, 4, 4]])], [labels(), labels(7)])
    expect = torch.zeros(2, 3, 8, 8)
    expect[0, :, 0:4, 4:8] = h_img[0, :, ::2, ::2]
    assert torch.equal(out.images, expect)
    assert torch.equal(out.lam, t([0.75, 1.0]))
    assert torch.equal(out.boxes[0], t([[4, 0, 8, 4], [5, 2, 7, 4]]))
    assert torch.equal(out.boxes[1], t([[3, 3, 4, 4]])) and torch.equal(out.labels[1], labels(7))
    assert torch.equal(out.labels[0], labels(5, 6))


def test_det_uint8_history_of_another_size_and_bilinear():
    """A padded batch changes size between steps: the whole history (16x8) goes into the box all the same."""
    mix = DetRecursiveMix()
    hist = torch.randint(0, 256, (1, 3, 16, 8), dtype=torch.uint8)
    mix(hist.clone(), [t([[0, 0, 8, 16], [2, 4, 4, 8]])], [labels(1, 2)])
    fix_boxes(mix, [2, 0, 6, 8])  # 4 wide, 8 high: scale 1/2 both ways
    out = mix(torch.zeros(1, 3, 12, 12, dtype=torch.uint8), [torch.zeros(0, 4)], [labels()])
    assert out.images.dtype == torch.uint8
    assert torch.equal(out.images[0, :, 0:8, 2:6], hist[0, :, ::2, ::2])
    assert torch.equal(out.boxes[0], t([[2, 0, 6, 8], [3, 2, 4, 4]]))

    bil = DetRecursiveMix(interpolation="bilinear")
    h = torch.rand(2, 3, 8, 8)
    bil(h.clone(), [torch.zeros(0, 4)] * 2, [labels()] * 2)
    fix_boxes(bil, [1, 2, 6, 5])
    out = bil(torch.zeros(2, 3, 8, 8), [torch.zeros(0, 4)] * 2, [labels()] * 2)
    assert torch.equal(out.images[:, :, 2:5, 1:6], F.interpolate(h, size=(3, 5), mode="bilinear", align_corners=True))


def test_det_draws_the_same_boxes_as_classification_recursive_mix():
    """Same generator, same draws: the dense mix's box for a seed is RecursiveMix's box for that seed."""
    det, cls = DetRecursiveMix(alpha=0.7, seed=11), RecursiveMix(alpha=0.7, seed=11, num_classes=3)
    for step in range(5):
        x = torch.rand(4, 3, 24, 40)
        d = det(x.clone(), [torch.zeros(0, 4)] * 4, [labels()] * 4)
        c = cls(x.clone(), torch.zeros(4, dtype=torch.long))
        assert (d.mix_boxes is None) == (c.boxes is None)
        if c.boxes is not None:
            assert torch.equal(d.mix_boxes, c.boxes) and torch.equal(d.lam, c.lam)
            assert torch.equal(d.images, c.images)


def test_det_epochs_clear_history_unless_kept():
    for keep in (False, True):
        mix = DetRecursiveMix(keep_history_across_epochs=keep)
        mix(torch.zeros(1, 3, 8, 8), [torch.zeros(0, 4)], [labels()])
        mix.set_epoch(1)
        assert mix.has_history == keep
        out = mix(torch.zeros(1, 3, 8, 8), [torch.zeros(0, 4)], [labels()])
        if not keep:  # a fresh history: this batch passes through and becomes it
            assert out.mix_boxes is None and out.lam.tolist() == [1.0] and mix.has_history


def test_det_contract_errors():
    mix = DetRecursiveMix()
    with pytest.raises(ValueError, match="min_visible must be in"):
        DetRecursiveMix(min_visible=1.5)
    with pytest.raises(ValueError, match="clip must be one of"):
        DetRecursiveMix(clip="shrink")
    with pytest.raises(ValueError, match="2 images but 1 box tensors"):
        mix(torch.zeros(2, 3, 8, 8), [torch.zeros(0, 4)], [labels(), labels()])
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a float \(k, 4\)"):
        mix(torch.zeros(1, 3, 8, 8), [torch.zeros(2, 4, dtype=torch.long)], [labels(1, 2)])
    with pytest.raises(ValueError, match=r"labels\[0\] must be an integer \(2,\)"):
        mix(torch.zeros(1, 3, 8, 8), [torch.zeros(2, 4)], [labels(1)])
    assert "det_recursive_mix" in DENSE_MIXES and "det_recursive_mix" not in MIXES


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _det_batches(seed, steps, n=3, size=(32, 48)):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.rand(n, 3, *size, generator=g)
        boxes, labs = [], []
        for _ in range(n):
            k = int(torch.randint(0, 4, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * torch.tensor([size[1] - 8, size[0] - 8])
            wh = 4 + torch.rand(k, 2, generator=g) * 12
            boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([size[1], size[0]]))], 1))
            labs.append(torch.randint(0, 5, (k,), generator=g))
        yield images, boxes, labs


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_det_state_dict_resumes_bit_for_bit(box):
    batches = list(_det_batches(0, 6))
    a = DetRecursiveMix(alpha=1.0, box=box, seed=3)
    for images, boxes, labs in batches[:3]:
        a(images.clone(), boxes, labs)
    state = _roundtrip(a.state_dict())
    b = DetRecursiveMix(alpha=1.0, box=box, seed=12345)
    b.load_state_dict(state)
    mixed = 0
    for images, boxes, labs in batches[3:]:
        x, y = a(images.clone(), boxes, labs), b(images.clone(), boxes, labs)
        assert torch.equal(x.images, y.images) and torch.equal(x.lam, y.lam)
        mixed += x.mix_boxes is not None
        assert (x.mix_boxes is None and y.mix_boxes is None) or torch.equal(x.mix_boxes, y.mix_boxes)
        for p, q in zip(x.boxes + x.labels, y.boxes + y.labels):
            assert torch.equal(p, q)
    assert mixed == 3
    with pytest.raises(ValueError, match="state_dict has min_visible=0.3, this mix has 0.5"):
        DetRecursiveMix(alpha=1.0, box=box, min_visible=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict is for mix 'det_recursive_mix', not 'seg_recursive_mix'"):
        SegRecursiveMix().load_state_dict(state)


# -- segmentation -----------------------------------------------------------------------------------

def test_seg_hand_computed_ignore_index_survives():
    mix = SegRecursiveMix(ignore_index=255)
    h_img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    h_seg = torch.arange(2 * 8 * 8, dtype=torch.int64).reshape(2, 8, 8) % 150
    h_seg[0, 0:2, 0:2] = 255  # lands on pasted pixel (row 4, col 0) of sample 0
    mix(h_img.clone(), h_seg.clone())
    fix_boxes(mix, [0, 4, 4, 8])
    seg = torch.full((2, 8, 8), 3, dtype=torch.int64)
    seg[1, 0, 7] = 255  # outside the paste: stays
    out = mix(torch.zeros(2, 3, 8, 8), seg)
    expect_img = torch.zeros(2, 3, 8, 8)
    expect_img[:, :, 4:8, 0:4] = h_img[:, :, ::2, ::2]
    expect_seg = torch.full((2, 8, 8), 3, dtype=torch.int64)
    expect_seg[1, 0, 7] = 255
    expect_seg[:, 4:8, 0:4] = h_seg[:, ::2, ::2]
    assert torch.equal(out.images, expect_img) and torch.equal(out.seg, expect_seg)
    assert out.seg is seg  # in place
    assert out.seg[0, 4, 0] == 255 and out.seg[1, 0, 7] == 255
    assert torch.equal(out.mix_boxes, t([[0, 4, 4, 8]] * 2)) and torch.equal(out.lam, t([0.75, 0.75]))
    assert out.boxes is None and out.labels is None


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_seg_bilinear_images_nearest_labels(box):
    mix = SegRecursiveMix(interpolation="bilinear", box=box)
    h_img = torch.rand(2, 3, 16, 16)
    h_seg = torch.randint(0, 4, (2, 16, 16))
    h_seg[:, ::3] = 255
    mix(h_img.clone(), h_seg.clone())
    fix_boxes(mix, [2, 1, 9, 12] if box == "batch" else [[2, 1, 9, 12], [2, 1, 9, 12]])
    out = mix(torch.zeros(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.int64))
    want = F.interpolate(h_img, size=(11, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.images[:, :, 1:12, 2:9], want, rtol=0, atol=1e-6)
    want_seg = F.interpolate(h_seg[:, None].float(), size=(11, 7), mode="nearest")[:, 0].long()
    assert torch.equal(out.seg[:, 1:12, 2:9], want_seg)
    assert set(out.seg.unique().tolist()) <= {0, 1, 2, 3, 255}  # no label was blended
    assert (out.seg[:, 1:12, 2:9] == 255).any()


def test_seg_history_is_previous_mixed_and_resumes_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 24, 24, generator=g), torch.randint(0, 150, (2, 24, 24), generator=g))
               for _ in range(6)]
    a = SegRecursiveMix(alpha=1.0, seed=5)
    prev = None
    for i, (x, s) in enumerate(batches[:3]):
        out = a(x.clone(), s.clone())
        if prev is not None and out.mix_boxes is not None:  # the pasted region is the previous *output*
            x1, y1, x2, y2 = (int(v) for v in out.mix_boxes[0])
            want = F.interpolate(prev[1][:, None].float(), size=(y2 - y1, x2 - x1), mode="nearest")[:, 0].long()
            assert torch.equal(out.seg[:, y1:y2, x1:x2], want)
        prev = (out.images.clone(), out.seg.clone())
    b = SegRecursiveMix(alpha=1.0, seed=0)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for x, s in batches[3:]:
        p, q = a(x.clone(), s.clone()), b(x.clone(), s.clone())
        assert torch.equal(p.images, q.images) and torch.equal(p.seg, q.seg) and torch.equal(p.lam, q.lam)
    with pytest.raises(ValueError, match="state_dict has ignore_index=255, this mix has 0"):
        SegRecursiveMix(alpha=1.0, ignore_index=0).load_state_dict(a.state_dict())


def test_seg_contract_errors_and_epochs():
    mix = SegRecursiveMix()
    with pytest.raises(ValueError, match=r"seg must be \(N, H, W\) = \(2, 8, 8\)"):
        mix(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="seg must hold integer labels"):
        mix(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        SegRecursiveMix(interpolation="bicubic")
    mix(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    mix.set_epoch(1)
    assert not mix.has_history


@pytest.mark.gpu
def test_dense_mixes_on_cuda_match_cpu():
    for box in ("batch", "sample"):
        batches = list(_det_batches(2, 4))
        cpu, gpu = DetRecursiveMix(alpha=1.0, box=box, seed=1), DetRecursiveMix(alpha=1.0, box=box, seed=1)
        for images, boxes, labs in batches:
            a = cpu(images.clone(), boxes, labs)
            b = gpu(images.cuda(), [x.cuda() for x in boxes], [x.cuda() for x in labs])
            assert b.images.device.type == "cuda" and b.boxes[0].device.type == "cuda"
            assert torch.equal(a.images, b.images.cpu())
            for p, q in zip(a.boxes + a.labels, b.boxes + b.labels):
                torch.testing.assert_close(p, q.cpu(), rtol=0, atol=1e-5)
        s_cpu, s_gpu = SegRecursiveMix(alpha=1.0, box=box), SegRecursiveMix(alpha=1.0, box=box)
        for _ in range(3):
            x, s = torch.rand(4, 3, 32, 32), torch.randint(0, 255, (4, 32, 32))
            p, q = s_cpu(x.clone(), s.clone()), s_gpu(x.cuda(), s.cuda())
            assert torch.equal(p.images, q.images.cpu()) and torch.equal(p.seg, q.seg.cpu())


# -- mmdet / mmseg integration ----------------------------------------------------------------------

from mm_fixtures import needs_mm, own_singletons  # noqa: E402  (one probe of the OpenMMLab stack for every mm test)

ATSS_TINY = """
_base_ = '{base}'
data_root = '{root}/'
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True), dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
model = dict(backbone=dict(init_cfg=None),
             data_preprocessor=dict(batch_augments=[dict(type='DetRecursiveMixAug', alpha=1.0)]))
custom_hooks = []
train_cfg = dict(max_epochs=2, val_interval=100)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=None, visualization=dict(draw=False))
log_processor = dict(window_size=1)
"""

UPERNET_TINY = """
_base_ = '{base}'
data_root = '{root}'
crop_size = (128, 128)
# Narrow heads (see test_mm.py): the width is not what these tests check.
model = dict(data_preprocessor=dict(size=crop_size, rmix=dict(alpha=1.0)), backbone=dict(init_cfg=None),
             decode_head=dict(channels=64), auxiliary_head=dict(channels=64))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75), dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'), dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
custom_hooks = []
train_cfg = dict(max_iters=3, val_interval=100)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=3, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=None, visualization=dict(draw=False))
log_processor = dict(window_size=1)
"""


def _load_cfg(tmp: Path, template: str, base: Path, root: Path, scope: str):
    import warnings

    from mmengine.config import Config

    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    path = tmp / f"tiny_{base.stem}.py"
    path.write_text(template.format(base=base, root=root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Config.fromfile(str(path))
    cfg.work_dir = str(tmp / "wd")
    return cfg


@needs_mm
def test_densrm_configs_switch_the_mix_on():
    from mmengine.config import Config

    atss = Config.fromfile(str(ATSS_DENSRM))
    (aug,) = atss.model.data_preprocessor.batch_augments
    assert aug.type == "DetRecursiveMixAug" and aug.alpha == 0.5 and aug.min_visible == 0.3
    det_pre = atss.model.data_preprocessor
    assert det_pre.type == "DetDataPreprocessor" and det_pre.pad_size_divisor == 32
    assert "trainers.mm.dense_mix" in atss.custom_imports.imports and "trainers.mm.hooks" in atss.custom_imports.imports
    assert atss.model.backbone.init_cfg.checkpoint == "checkpoints/r50_rm.pth"  # the rest is the base config's
    assert {"type": "PretrainedBackboneCheck"} in atss.custom_hooks and atss.train_cfg.max_epochs == 12
    up = Config.fromfile(str(UPERNET_DENSRM))
    pre = up.model.data_preprocessor
    assert pre.type == "RecursiveMixSegDataPreProcessor"
    assert pre.rmix.alpha == 0.5 and pre.rmix.interpolation == "nearest"
    assert pre.size == (512, 512) and pre.seg_pad_val == 255 and pre.bgr_to_rgb  # the base's settings kept
    assert up.model.backbone.type == "ResNet" and up.optim_wrapper.optimizer.type == "AdamW"


def _collate(ds, idx):
    from mmengine.dataset import pseudo_collate

    return pseudo_collate([ds[i] for i in idx])


@needs_mm
@pytest.mark.parametrize("boxtype2tensor", [True, False])
def test_det_batch_augment_inside_det_data_preprocessor(tmp_path, boxtype2tensor):
    """DetRecursiveMixAug as a `batch_augments` entry of a real DetDataPreprocessor on COCO fixture batches:
    the same images, boxes and labels as DetRecursiveMix applied to the plain preprocessor's output, written
    back as the box type mmdet gave, metainfo untouched, nothing mixed when not training."""
    import copy

    from mmdet.registry import DATASETS, MODELS
    from mmdet.structures.bbox import HorizontalBoxes

    from mm_fixtures import write_coco
    from trainers.mm.dense_mix import DetRecursiveMixAug

    coco = write_coco(tmp_path / "coco", train=6, val=1, size=(320, 256))
    cfg = _load_cfg(tmp_path, ATSS_TINY, ATSS_DENSRM, coco, "mmdet")
    ds = DATASETS.build(cfg.train_dataloader.dataset)
    pre_cfg = copy.deepcopy(cfg.model.data_preprocessor)
    pre_cfg.boxtype2tensor = boxtype2tensor
    pre = MODELS.build(pre_cfg)
    (aug,) = pre.batch_augments
    assert isinstance(aug, DetRecursiveMixAug)
    pre_cfg.pop("batch_augments")
    plain = MODELS.build(pre_cfg)
    ref = DetRecursiveMix(alpha=1.0)
    ref.load_state_dict(aug.mix.state_dict())

    mixed, prev = 0, None
    for step, idx in enumerate([(0, 1), (2, 3), (4, 5), (1, 2)]):
        data = _collate(ds, idx)
        got = pre(copy.deepcopy(data), training=True)
        base = plain(copy.deepcopy(data), training=True)
        boxes = [s.gt_instances.bboxes for s in base["data_samples"]]
        boxes = [b.tensor if isinstance(b, HorizontalBoxes) else b for b in boxes]
        want = ref(base["inputs"], boxes, [s.gt_instances.labels for s in base["data_samples"]])
        assert torch.equal(got["inputs"], want.images)
        for s, b_s, b, l in zip(got["data_samples"], base["data_samples"], want.boxes, want.labels):
            gb = s.gt_instances.bboxes
            assert isinstance(gb, HorizontalBoxes) != boxtype2tensor
            assert torch.equal(gb.tensor if isinstance(gb, HorizontalBoxes) else gb, b)
            assert torch.equal(s.gt_instances.labels, l) and len(s.gt_instances) == len(l)
            assert s.metainfo == b_s.metainfo  # img_shape, pad_shape, batch_input_shape, ... unchanged
        if want.mix_boxes is not None:
            mixed += 1
            x1, y1, x2, y2 = (int(v) for v in want.mix_boxes[0])
            if prev is not None and x2 > x1 and y2 > y1:  # the paste is the previous *mixed* batch, resized
                assert torch.equal(got["inputs"][:, :, y1:y2, x1:x2],
                                   F.interpolate(prev, size=(y2 - y1, x2 - x1), mode="nearest"))
        else:
            assert step == 0
        prev = got["inputs"].clone()
    assert mixed == 3
    # validation / test batches pass through
    data = _collate(ds, (0, 1))
    assert torch.equal(pre(copy.deepcopy(data), training=False)["inputs"],
                       plain(copy.deepcopy(data), training=False)["inputs"])


@needs_mm
def test_seg_data_preprocessor_subclass(tmp_path):
    """RecursiveMixSegDataPreProcessor on ADE20K fixture batches equals SegDataPreProcessor followed by
    SegRecursiveMix, gt_sem_seg updated, the ignore label (255: padding and 'other') kept."""
    import copy

    from mmseg.registry import DATASETS, MODELS

    from mm_fixtures import write_ade20k
    from trainers.mm.dense_mix import RecursiveMixSegDataPreProcessor

    ade = write_ade20k(tmp_path / "ade", train=6, val=1, size=(96, 160))
    cfg = _load_cfg(tmp_path, UPERNET_TINY, UPERNET_DENSRM, ade, "mmseg")
    ds = DATASETS.build(cfg.train_dataloader.dataset)
    pre = MODELS.build(cfg.model.data_preprocessor)
    assert isinstance(pre, RecursiveMixSegDataPreProcessor) and pre.mix.ignore_index == 255
    plain_cfg = copy.deepcopy(cfg.model.data_preprocessor)
    plain_cfg.type = "SegDataPreProcessor"
    plain_cfg.pop("rmix")
    plain = MODELS.build(plain_cfg)
    ref = SegRecursiveMix(alpha=1.0)
    ref.load_state_dict(pre.mix.state_dict())
    mixed = 0
    for idx in [(0, 1), (2, 3), (4, 5)]:
        data = _collate(ds, idx)
        got = pre(copy.deepcopy(data), training=True)
        base = plain(copy.deepcopy(data), training=True)
        seg = torch.cat([s.gt_sem_seg.data for s in base["data_samples"]])
        want = ref(base["inputs"], seg)
        assert got["inputs"].shape == (2, 3, 128, 128)
        assert torch.equal(got["inputs"], want.images)
        got_seg = torch.cat([s.gt_sem_seg.data for s in got["data_samples"]])
        assert torch.equal(got_seg, want.seg)
        assert (got_seg == 255).any()  # crop padding / reduce_zero_label's 'other' survive
        assert set(got_seg.unique().tolist()) <= set(range(150)) | {255}  # labels copied, never blended
        mixed += want.mix_boxes is not None
    assert mixed == 2
    with pytest.raises(ValueError, match="rmix.ignore_index=0 but seg_pad_val=255"):
        MODELS.build(dict(type="RecursiveMixSegDataPreProcessor", seg_pad_val=255, rmix=dict(ignore_index=0)))


def _train(cfg):
    from mmengine.runner import Runner

    own_singletons(cfg)
    return Runner.from_cfg(cfg)


@needs_mm
@pytest.mark.slow
def test_atss_trains_with_dense_rm(tmp_path):
    """A few ATSS iterations on CPU with DetRecursiveMixAug: finite losses; the mix passes the first batch of
    each epoch through (history cleared at the epoch boundary) and mixes the others."""
    from mm_fixtures import write_coco

    coco = write_coco(tmp_path / "coco", train=4, val=1, size=(256, 256))
    cfg = _load_cfg(tmp_path, ATSS_TINY, ATSS_DENSRM, coco, "mmdet")
    runner = _train(cfg)
    aug = runner.model.data_preprocessor.batch_augments[0]
    seen = []  # per iteration: (pasted?, boxes per sample before, after)
    forward, draw = aug.forward, aug.mix._draw

    def spy_draw(*a):
        seen[-1][0] = True
        return draw(*a)

    def spy(inputs, data_samples):
        seen.append([False, [len(s.gt_instances) for s in data_samples], None])
        out = forward(inputs, data_samples)
        seen[-1][2] = [len(s.gt_instances) for s in data_samples]
        return out

    aug.forward, aug.mix._draw = spy, spy_draw
    runner.train()
    assert [s[0] for s in seen] == [False, True, False, True], seen  # 2 epochs x 2 iterations
    assert seen[0][1] == seen[0][2] and seen[2][1] == seen[2][2]  # passed through: annotations as they were
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 4 and np.isfinite(losses).all(), losses
    for key in ("train/loss_cls", "train/loss_bbox", "train/loss_centerness"):
        assert np.isfinite(runner.message_hub.get_scalar(key).data[0]).all(), key


@needs_mm
@pytest.mark.slow
def test_upernet_trains_with_dense_rm(tmp_path):
    from mm_fixtures import write_ade20k

    ade = write_ade20k(tmp_path / "ade", train=4, val=1, size=(128, 192))
    cfg = _load_cfg(tmp_path, UPERNET_TINY, UPERNET_DENSRM, ade, "mmseg")
    runner = _train(cfg)
    pre = runner.model.data_preprocessor
    mixed = []
    forward = pre.mix.__class__.__call__

    class Spy(type(pre.mix)):
        def __call__(self, images, seg):
            out = forward(self, images, seg)
            mixed.append(out.mix_boxes is not None)
            return out

    pre.mix.__class__ = Spy
    runner.train()
    assert mixed == [False, True, True], mixed  # iteration-based: one history for the whole run
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 3 and np.isfinite(losses).all(), losses
