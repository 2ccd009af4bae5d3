"""On a CUDA machine: step() must never synchronise with the host (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import TinyTransformer, lm_batches, lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced"])
def test_step_does_not_synchronise_under_cuda_sync_debug_mode(features):
    # from the very first step (which builds the layout and allocates the moments), and in the
    # steps after a meta-update (which recompute the carried norms), also while a scheduler cycles
    # the betas (the plan's constants are updated in place) and with multipliers refreshed every k steps
    for refresh_every in (1, 3):
        model = TinyTransformer().cuda()
        opt = MetaAdamW(model.named_parameters(), features=features, modulator_heads=1, gating=True,
                        refresh_every=refresh_every)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
        batches = [tuple(t.cuda() for t in b) for b in lm_batches()]
        lm_loss(model, batches[0]).backward()
        torch.cuda.synchronize()
        for round_ in range(2):
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(4):
                    opt.step()
                    sched.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert not opt.meta_step(model, lm_loss, *batches).skipped  # meta-updates may synchronise (floats)
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


def test_exact_meta_update_through_a_cudnn_lstm_and_training_keeps_cudnn():
    # cuDNN's LSTM has no double backward: exact mode turns cuDNN off for that one pass only
    from ablate.tasks.models_text import BiLSTMClassifier

    torch.manual_seed(0)
    model = BiLSTMClassifier(vocab_size=50, embed_dim=8, hidden_size=8, num_layers=1, num_classes=2,
                             dropout=0.0, pad_id=0).cuda().train()
    opt = MetaAdamW(model.named_parameters(), meta_gradient="exact", meta_lr=1.0, **_small())
    batches = [(torch.randint(1, 50, (4, 12), device="cuda"), torch.randint(0, 2, (4,), device="cuda"))
               for _ in range(3)]

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    loss_fn(model, batches[0]).backward()
    opt.step()
    assert not opt.meta_step(model, loss_fn, *batches).skipped
    assert torch.backends.cudnn.enabled


def _small():
    from tests.metaadamw.helpers import small_kwargs

    return small_kwargs()


def test_construction_and_meta_step_leave_the_cuda_random_stream_alone():
    # as on the CPU (test_meta_step): dropout on the GPU draws from the CUDA generator
    from tests.metaadamw.helpers import small_kwargs

    torch.manual_seed(5)
    expected = torch.rand(4, device="cuda")
    torch.manual_seed(5)
    model = TinyTransformer(dropout=0.1).cuda().train()
    after_model = torch.cuda.get_rng_state()
    opt = MetaAdamW(model.named_parameters(), features="enhanced", **small_kwargs())
    assert torch.equal(torch.cuda.get_rng_state(), after_model)
    batches = [tuple(t.cuda() for t in b) for b in lm_batches()]
    torch.manual_seed(5)
    assert not opt.meta_step(model, lm_loss, *batches).skipped
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_a_model_moved_to_the_gpu_after_the_optimizer_was_built_is_refused_naming_both():
    # model.cuda() moves the tensors in place: the modulator and statistics stayed on the CPU, and step() failed
    # with torch's mixed-device error from inside
    from tests.metaadamw.helpers import small_kwargs

    model = TinyTransformer()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    model.cuda()
    lm_loss(model, tuple(t.cuda() for t in lm_batches()[0])).backward()
    with pytest.raises(RuntimeError, match=r"^the parameters are on cuda:0, but MetaAdamW was built when they were on "
                                           r"cpu.*after model.to\(device\)"):
        opt.step()
