"""The training layer: the STCCL loss against a direct computation from the
reference correlations, adaptive weights, gradients, the two training stages,
checkpoints and logs, and DDP against a single process."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import stccl_ops
from stccl import (CorrelationMetric, SmallBackbone, STCCLLoss, adaptive_weights, train_metric,
                   train_spfem)
from stccl.demo import SyntheticTalkingFaces, TinyGenerator, expression_loss
from stccl_ops import reference

from helpers import HAS_EXTENSION


def clips(seed=0, shape=(2, 4, 6, 7, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def direct_loss(src, gen, criterion, weighting, seed=None, num_samples=16, tau=0.07,
                frame_stride=1):
    """The STCCL loss written out from the reference correlations."""
    def weights(s):
        if weighting == "none":
            return torch.ones_like(s)
        t = torch.sigmoid((1 - s) / 0.5)
        return torch.where(t > 0.8, 2 * t * t, torch.ones_like(t))

    def compare(s, g):
        w = weights(s)
        if criterion == "l1":
            return (w * (g - s).abs()).mean()
        B, T, KK, H, W = s.shape
        where = torch.randperm(H * W, generator=seed)[:min(num_samples, H * W)]
        total, count = 0.0, 0
        for b in range(B):
            for t in range(T):
                ds = F.normalize(s[b, t].reshape(KK, -1)[:, where].T, dim=1)
                dg = F.normalize(g[b, t].reshape(KK, -1)[:, where].T, dim=1)
                logits = dg @ ds.T / tau
                lw = w[b, t].reshape(KK, -1)[:, where].mean(0)
                for i in range(len(where)):
                    total = total + lw[i] * -torch.log_softmax(logits[i], 0)[i]
                    count += 1
        return total / count

    spatial = compare(reference.spatial_correlation(src, 3), reference.spatial_correlation(gen, 3))
    temporal = compare(reference.temporal_correlation(src, 3, frame_stride=frame_stride),
                       reference.temporal_correlation(gen, 3, frame_stride=frame_stride))
    return spatial + temporal


@pytest.mark.parametrize("criterion", ["l1", "nce"])
@pytest.mark.parametrize("weighting", ["adaptive", "none"])
def test_loss_equals_direct_computation(criterion, weighting):
    src, gen = clips()
    loss = STCCLLoss(3, temporal_kernel_size=3, criterion=criterion, weighting=weighting,
                     num_samples=16, backend="reference")
    spatial_gen = torch.Generator().manual_seed(7)
    result = loss(src, gen, generator=spatial_gen)
    expected = direct_loss(src, gen, criterion, weighting, torch.Generator().manual_seed(7))
    # The NCE form draws the locations twice (spatial, temporal) from one
    # generator in both computations.
    torch.testing.assert_close(result.total, expected, rtol=1e-5, atol=1e-6)
    assert set(result.log()) >= {"stccl", "spatial", "temporal", "mean_weight"}


def test_zero_for_identical_clips_positive_otherwise():
    src, gen = clips()
    loss = STCCLLoss(backend="reference")
    assert loss(src, src.clone()).total.item() == 0
    assert loss(src, gen).total.item() > 0
    nce = STCCLLoss(criterion="nce", num_samples=32, backend="reference")
    g = torch.Generator().manual_seed(0)
    same = nce(src, src.clone(), generator=g).total.item()
    g = torch.Generator().manual_seed(0)
    assert same < nce(src, gen, generator=g).total.item()


def test_adaptive_weight_rule_on_hand_made_values():
    s = torch.tensor([1.0, 0.5, 0.31, 0.30, 0.0, -1.0])
    w = adaptive_weights(s)
    t = torch.sigmoid((1 - s) / 0.5)
    assert w[0] == 1 and w[1] == 1 and w[2] == 1  # t = 0.5, 0.73, 0.799: not above 0.8
    torch.testing.assert_close(w[3:], 2 * t[3:] ** 2)
    assert math.isclose(w[4].item(), 2 * (1 / (1 + math.exp(-2))) ** 2, rel_tol=1e-6)
    assert (adaptive_weights(s, threshold=0.99) == 1).all()
    assert not adaptive_weights(s.requires_grad_()).requires_grad


def test_gradients_reach_the_generated_side_only():
    src, gen = clips()
    src.requires_grad_()
    gen.requires_grad_()
    STCCLLoss(backend="reference")(src, gen).total.backward()
    assert src.grad is None and gen.grad is not None and gen.grad.abs().sum() > 0
    metric = CorrelationMetric(SmallBackbone((4, 8))).freeze()
    frames_src = torch.rand(2, 3, 3, 16, 16)
    frames_gen = torch.rand(2, 3, 3, 16, 16, requires_grad=True)
    STCCLLoss(feature_extractor=metric)(frames_src, frames_gen).total.backward()
    assert frames_gen.grad is not None and frames_gen.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


@pytest.mark.skipif(not HAS_EXTENSION, reason="stccl_ops._C is not built")
@pytest.mark.parametrize("criterion", ["l1", "nce"])
def test_cpp_and_reference_backends_agree(criterion):
    src, gen = clips(3)
    gen.requires_grad_()
    results = []
    for backend in ("reference", "cpp"):
        loss = STCCLLoss(criterion=criterion, num_samples=20, backend=backend)
        result = loss([src, src[:, :, :3]], [gen, gen[:, :, :3]],
                      generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(result.total, gen)
        results.append((result.total, grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make,pattern", [
    (lambda: STCCLLoss(criterion="l2"), "criterion must be one of"),
    (lambda: STCCLLoss(weighting="hard"), "weighting must be one of"),
    (lambda: STCCLLoss()(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 5)),
     r"layer 0 shapes differ"),
    (lambda: STCCLLoss(frame_stride=2)(torch.zeros(1, 2, 2, 4, 4), torch.zeros(1, 2, 2, 4, 4)),
     r"more than frame_stride = 2 frames, got T = 2"),
    (lambda: STCCLLoss()(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)), r"\(B, T, C, H, W\)"),
    (lambda: STCCLLoss()([torch.zeros(1, 3, 2, 4, 4)], []), "1 feature layers, generated 0"),
    (lambda: STCCLLoss(layer_weights=[1, 2])([torch.zeros(1, 3, 2, 4, 4)],
                                              [torch.zeros(1, 3, 2, 4, 4)]), "layer_weights"),
])
def test_bad_inputs(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_metric_learning_and_spfem_training_lower_their_losses(tmp_path):
    torch.manual_seed(0)
    pairs = torch.utils.data.DataLoader(SyntheticTalkingFaces(16, pairs=True), batch_size=8)
    metric = CorrelationMetric(SmallBackbone((8, 16)), head_channels=(8, 8))
    metric, history = train_metric(metric, pairs, epochs=6, lr=3e-3, progress=False)
    assert history[-1] < history[0]
    assert all(not p.requires_grad for p in metric.parameters())
    generator = TinyGenerator()
    loss = STCCLLoss(feature_extractor=metric)
    loader = torch.utils.data.DataLoader(SyntheticTalkingFaces(16), batch_size=8)
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-3)
    ckpt, log = str(tmp_path / "g.pt"), str(tmp_path / "log.csv")
    rows = train_spfem(generator, loader, loss, expression_loss, optimizer, epochs=4,
                       clip_grad_norm=1.0, checkpoint=ckpt, log_path=log, progress=False)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert os.path.exists(ckpt) and len(open(log).readlines()) == len(rows) + 1
    # resume: the finished run continues at epoch 4 and does nothing more
    assert train_spfem(generator, loader, loss, expression_loss, optimizer, epochs=4,
                       checkpoint=ckpt, progress=False) == []
    more = train_spfem(generator, loader, loss, expression_loss, optimizer, epochs=5,
                       checkpoint=ckpt, progress=False)
    assert {r["epoch"] for r in more} == {4}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, batch, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    generator = TinyGenerator()
    model = torch.nn.parallel.DistributedDataParallel(generator)
    clip, emotion = batch
    part = slice(rank * len(clip) // world, (rank + 1) * len(clip) // world)
    generated = model(clip[part], emotion[part])
    STCCLLoss(backend="reference")(clip[part], generated).total.backward()
    if rank == 0:
        torch.save([p.grad for p in generator.parameters()], result_path)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    data = SyntheticTalkingFaces(4)
    batch = (torch.stack([data[i][0] for i in range(4)]),
             torch.stack([data[i][1] for i in range(4)]))
    torch.manual_seed(0)
    generator = TinyGenerator()
    STCCLLoss(backend="reference")(batch[0], generator(*batch)).total.backward()
    expected = [p.grad for p in generator.parameters()]
    result_path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), batch, result_path), nprocs=2, join=True)
    got = torch.load(result_path)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
