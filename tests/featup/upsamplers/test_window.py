"""Crops and channel subsets upsampled from low-res windows equal the crops of whole maps (featup.upsamplers.window)."""

import pytest
import torch

from featup.upsamplers.bilinear import BilinearUpsampler
from featup.upsamplers.jbu import JBUStack
from featup.upsamplers.window import CropPlan, Step, needs_all_channels, upsample_window, window_steps

LOW = (20, 22)  # non-square, and large enough that a small crop needs only part of it
STAGES = 2
OUT = (LOW[0] * 4, LOW[1] * 4)


def _stack(method: str) -> JBUStack:
    """A JBU with random (not initial) parameters, so every filter term matters."""
    stack = JBUStack(5, STAGES, backend="eager", method=method).eval()
    generator = torch.Generator().manual_seed(1)
    stack.reset_parameters(generator)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return stack


def _windows(plan: CropPlan, lowres: torch.Tensor, image: torch.Tensor, origins: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's low-res window and the image over it, as a reader cuts them."""
    fy, fx = image.shape[2] // lowres.shape[2], image.shape[3] // lowres.shape[3]
    boxes = [plan.lowres_box(o) for o in origins]
    low = torch.stack([lowres[b, :, t : t + h, l : l + w] for b, (t, l, h, w) in enumerate(boxes)])
    img = torch.stack([image[b, :, t * fy : (t + h) * fy, l * fx : (l + w) * fx] for b, (t, l, h, w) in enumerate(boxes)])
    return low, img


def _crops(full: torch.Tensor, origins: list, size: tuple) -> torch.Tensor:
    return torch.stack([full[b, :, t : t + size[0], l : l + size[1]] for b, (t, l) in enumerate(origins)])


@pytest.mark.parametrize("method", ["composed", "upsample"])
def test_jbu_crops_from_windows_equal_crops_of_the_whole_map_at_borders_and_inside(method, one_torch_thread):
    stack = _stack(method)
    lowres = torch.randn(3, 5, *LOW, generator=torch.Generator().manual_seed(2))
    image = torch.randn(3, 3, OUT[0] * 2, OUT[1] * 2, generator=torch.Generator().manual_seed(3))  # pooled 2x at the end
    with torch.no_grad():
        full = stack(lowres, image, OUT)
    steps = window_steps(stack, LOW, image.shape[2:], OUT)
    assert steps == (Step((2, 2), (8, 8)),) * STAGES  # bicubic 3 + radius 3 + margin 2
    for crop in [(8, 8), (30, 12)]:
        plan = CropPlan.build(steps, LOW, OUT, crop)
        assert plan.lengths[0] != LOW  # a part of the low-res map, not all of it
        last = (OUT[0] - crop[0], OUT[1] - crop[1])
        # corners, edges, one pixel in from them, and inside; each batch mixes places (one batched call per stage)
        for origins in [[(0, 0), last, (1, last[1] - 1)], [(37 % (last[0] + 1), 41), (last[0], 0), (last[0] // 2, 1)]]:
            low, img = _windows(plan, lowres, image, origins)
            for channels in (None, [4, 0]):
                got = upsample_window(stack, low, img, plan, origins, channels)
                expected = _crops(full, origins, crop)[:, channels or slice(None)]
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_halo_below_the_receptive_field_is_detected_so_the_margin_is_not_luck(one_torch_thread):
    stack = _stack("composed")
    lowres = torch.randn(1, 5, *LOW, generator=torch.Generator().manual_seed(4))
    image = torch.randn(1, 3, *OUT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = stack(lowres, image, OUT)

    def worst(halo: int) -> float:
        plan = CropPlan.build([Step((2, 2), (halo, halo))] * STAGES, LOW, OUT, (8, 8))
        errors = []
        for origin in [(y, x) for y in range(6, 70, 9) for x in range(6, 78, 11)]:
            low, img = _windows(plan, lowres, image, [origin])
            errors.append(float((upsample_window(stack, low, img, plan, [origin]) - _crops(full, [origin], (8, 8))).abs().max()))
        return max(errors)

    assert worst(6) < 1e-5  # exactly the receptive field (bicubic 3 + radius 3): exact
    assert worst(5) > 1e-3  # one pixel less: wrong somewhere


def test_bilinear_crops_and_channels_come_from_windows():
    up = BilinearUpsampler(4)
    lowres = torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(6))
    full = up(lowres, torch.zeros(2, 3, 40, 48), (40, 48))
    plan = CropPlan.build(window_steps(up, (10, 12), (40, 48), (40, 48)), (10, 12), (40, 48), (8, 8))
    assert plan.lengths[0] == (6, 6) and not needs_all_channels(up)
    for origins in [[(0, 0), (32, 40)], [(13, 17), (20, 3)]]:
        low = torch.stack([lowres[b, [2, 3], t : t + h, l : l + w] for b, (t, l, h, w) in enumerate(map(plan.lowres_box, origins))])
        got = upsample_window(up, low, None, plan, origins, [2, 3])  # the input holds the kept channels only
        torch.testing.assert_close(got, _crops(full, origins, (8, 8))[:, [2, 3]], atol=1e-6, rtol=0)


def test_a_final_resize_runs_whole_maps_then_crops():
    stack = _stack("composed")
    lowres, image = torch.randn(1, 5, 8, 8), torch.randn(1, 3, 28, 28)  # stride 14 style: 32 -> 28 by a final resize
    assert window_steps(stack, (8, 8), (28, 28), (28, 28)) is None
    plan = CropPlan.build(None, (8, 8), (28, 28), (10, 10))
    assert plan.lowres_box((5, 9)) == (0, 0, 8, 8)
    with torch.no_grad():
        full = stack(lowres, image, (28, 28))
    got = upsample_window(stack, lowres, image, plan, [(5, 9)], [1, 3])
    torch.testing.assert_close(got, full[:, [1, 3], 5:15, 9:19], atol=1e-5, rtol=0)
