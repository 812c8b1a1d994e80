"""The fused adaptive convolution and local similarity against the published unfold formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.errors import ConfigError, InputError
from featup.ops.adaptive_conv import adaptive_conv, adaptive_conv_unfold, local_similarity

BACKENDS = ["eager", "compiled"]


def _inputs(b=2, c=5, h=6, w=9, d=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + d - 1, w + d - 1, generator=g, dtype=dtype)
    filters = torch.randn(b, d * d, h, w, generator=g, dtype=dtype)
    return x, filters


def _similarity_reference(keys_padded, queries, d):
    b, k, h, w = queries.shape
    patches = F.unfold(keys_padded, d).view(b, k, d * d, h, w)
    return torch.einsum("bkphw,bkhw->bphw", patches, queries)


# Both diameters on the eager path; the compiled kernel for the JBU's 7 x 7 (one compile per kernel).
@pytest.mark.parametrize("backend,d", [("eager", 3), ("eager", 7), ("compiled", 7)])
@torch.inference_mode()  # as a job runs it (an inference tensor is its own compiled variant)
def test_adaptive_conv_matches_unfold_reference(backend, d):
    x, filters = _inputs(d=d, dtype=torch.float32)
    out = adaptive_conv(x, filters, backend=backend)
    torch.testing.assert_close(out, adaptive_conv_unfold(x, filters), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_conv_backward_matches_autograd_of_reference(backend):
    # float32 and a batch of 2: the training variant the JBU's gradient tests compile too
    x, filters = _inputs(b=2, c=3, h=4, w=5, dtype=torch.float32)
    x.requires_grad_(True)
    filters.requires_grad_(True)
    grad_out = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    gx, gf = torch.autograd.grad((adaptive_conv(x, filters, backend=backend) * grad_out).sum(), (x, filters))
    rx, rf = torch.autograd.grad((adaptive_conv_unfold(x, filters) * grad_out).sum(), (x, filters))
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gf, rf, atol=1e-5, rtol=1e-5)


def test_adaptive_conv_passes_gradcheck():
    x, filters = _inputs(b=1, c=2, h=3, w=4, d=3)
    assert torch.autograd.gradcheck(lambda a, f: adaptive_conv(a, f, backend="eager"), (x.requires_grad_(), filters.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_local_similarity_matches_unfold_reference(backend):
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(2, 4, 5, 8, generator=g)
    keys_padded = torch.randn(2, 4, 11, 14, generator=g)
    out = local_similarity(keys_padded, queries, 7, backend=backend)
    torch.testing.assert_close(out, _similarity_reference(keys_padded, queries, 7), atol=1e-5, rtol=1e-5)


def test_local_similarity_passes_gradcheck():
    """The eager similarities' hand-written backward, in float64."""
    g = torch.Generator().manual_seed(3)
    keys_padded = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, q: local_similarity(k, q, 3, backend="eager"), (keys_padded, queries))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_local_similarity_backward_matches_autograd_of_reference(needs):
    g = torch.Generator().manual_seed(4)
    keys_padded = torch.randn(2, 3, 10, 11, generator=g).requires_grad_(needs[0])
    queries = torch.randn(2, 3, 4, 5, generator=g).requires_grad_(needs[1])
    grad_out = torch.randn(2, 49, 4, 5, generator=g)
    inputs = [t for t in (keys_padded, queries) if t.requires_grad]
    got = torch.autograd.grad((local_similarity(keys_padded, queries, 7, backend="eager") * grad_out).sum(), inputs)
    want = torch.autograd.grad((_similarity_reference(keys_padded, queries, 7) * grad_out).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_half_precision_inputs_accumulate_accurately():
    x, filters = _inputs(c=8, dtype=torch.float32)
    out = adaptive_conv(x.half(), filters.half(), backend="eager")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), adaptive_conv_unfold(x.half().float(), filters.half().float()), atol=2e-2, rtol=1e-2)


def test_wrong_filter_shapes_are_named():
    x, filters = _inputs()
    with pytest.raises(InputError, match="odd square number of filter taps, got 48"):
        adaptive_conv(x, filters[:, :48])
    with pytest.raises(InputError, match="does not fit a 7x7 window"):
        adaptive_conv(x[:, :, 1:], filters)


def test_unknown_backend_is_refused():
    x, filters = _inputs()
    with pytest.raises(ConfigError, match="expected one of"):
        adaptive_conv(x, filters, backend="cuda-magic")
