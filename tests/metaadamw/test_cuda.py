"""On a CUDA machine: step() must never synchronise with the host (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import TinyTransformer, lm_batches, lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced"])
def test_step_does_not_synchronise_under_cuda_sync_debug_mode(features):
    model = TinyTransformer().cuda()
    opt = MetaAdamW(model.named_parameters(), features=features, modulator_heads=1, gating=True)
    batches = [tuple(t.cuda() for t in b) for b in lm_batches()]
    lm_loss(model, batches[0]).backward()
    opt.step()  # the first step builds its plan (host-side lists only)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.meta_step(model, lm_loss, *batches)  # meta-updates may synchronise (they return floats)
    assert torch.isfinite(opt.multipliers.alpha).all()


def test_finite_difference_meta_gradient_replays_the_cuda_dropout_masks():
    # the extra forward pass must replay the CUDA generator (dropout on the GPU draws from it)
    from tests.metaadamw.helpers import small_kwargs

    changes = []
    for meta_gradient in ("exact", "finite_difference"):
        torch.manual_seed(123)
        model = TinyTransformer(dropout=0.1).cuda().train()
        opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, meta_lr=1.0, **small_kwargs())
        batches = [tuple(t.cuda() for t in b) for b in lm_batches()]
        torch.manual_seed(0)
        before = [p.detach().clone() for p in opt.meta_parameters()]
        assert not opt.meta_step(model, lm_loss, *batches).skipped
        changes.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, opt.meta_parameters())]))
    assert (changes[0] - changes[1]).norm() / changes[0].norm() < 5e-3
