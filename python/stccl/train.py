"""Stage 2: SPFEM training with the STCCL loss added to the user's own losses.
Runs on one process or under torchrun with DistributedDataParallel."""

import csv
import json
import os

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialises the process group from torchrun's environment (nccl on GPUs,
    gloo on CPUs); returns (rank, world_size, device). Without torchrun: (0, 1,
    cuda or cpu)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def _distributed():
    return dist.is_available() and dist.is_initialized()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                **kwargs: Any) -> DataLoader:
    """A DataLoader that shards the dataset across processes under DDP."""
    sampler = None
    if _distributed():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        shuffle = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **kwargs)


class Logger:
    """Appends dict rows to a .csv or .jsonl file (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled, self.fields = path, enabled and path is not None, None

    def __call__(self, row):
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.path.endswith(".csv"):
            new = not os.path.exists(self.path)
            if self.fields is None:
                self.fields = list(row)
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _loss_value(value):
    """A user loss callable may return a tensor or a dict of named tensors."""
    if isinstance(value, dict):
        return sum(value.values()), {k: v.item() for k, v in value.items()}
    return value, {"task": value.item()}


def train_spfem(generator: nn.Module, loader: Iterable, stccl_loss: nn.Module,
                task_loss: Callable, optimizer: torch.optim.Optimizer, epochs: int = 1,
                stccl_weight: float = 1.0, clip_grad_norm: Optional[float] = None,
                checkpoint: Optional[str] = None, resume: bool = True,
                log_path: Optional[str] = None, device: Optional[torch.device] = None,
                progress: bool = True) -> list[dict]:
    """The SPFEM training loop.

    Args:
        generator: module, ``generator(source_clip, target_emotion) -> generated_clip``
            with clips (B, T, 3, H, W).
        loader: yields (source_clip, target_emotion) batches (make_loader shards
            it under DDP).
        stccl_loss: an STCCLLoss (with the frozen metric as feature_extractor, or
            features computed by the caller inside task_loss' generator).
        task_loss: ``task_loss(generated, source_clip, target_emotion)`` -> tensor
            or dict of tensors: the user's expression/reconstruction losses.
        optimizer: over the generator's parameters.
        clip_grad_norm: max gradient norm, or None.
        checkpoint: a path: saved after every epoch (rank 0) and, with
            resume=True, loaded at the start when it exists.
        log_path: .csv or .jsonl file of per-step losses (rank 0).
    Returns the per-step logged rows of this process.
    """
    from tqdm.auto import tqdm

    distributed = _distributed()
    rank = dist.get_rank() if distributed else 0
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    generator.to(device)
    model = generator
    if distributed:
        model = DistributedDataParallel(
            generator, device_ids=[device.index] if device.type == "cuda" else None)
    start_epoch, step = 0, 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=device)
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    log = Logger(log_path, enabled=rank == 0)
    rows = []
    for epoch in range(start_epoch, epochs):
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"spfem {epoch + 1}/{epochs}", disable=not progress or rank != 0)
        for source, target_emotion in bar:
            source, target_emotion = source.to(device), target_emotion.to(device)
            generated = model(source, target_emotion)
            task, task_parts = _loss_value(task_loss(generated, source, target_emotion))
            stccl = stccl_loss(source, generated)
            total = task + stccl_weight * stccl.total
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(generator.parameters(), clip_grad_norm)
            optimizer.step()
            row = {"epoch": epoch, "step": step, "loss": total.item(), **task_parts,
                   **stccl.log()}
            rows.append(row)
            log(row)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "stccl", "spatial", "temporal")})
            step += 1
        if checkpoint is not None and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
            torch.save({"generator": generator.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch, "step": step}, checkpoint)
    return rows
