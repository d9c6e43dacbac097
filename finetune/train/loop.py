"""One training epoch and one prediction pass, written the way accelerate's computer-vision example is.

These are the inner loops of :func:`finetune.train.trainer.fit`; they know nothing about recipes.
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from finetune.errors import FinetuneError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def freeze_bn_stats(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode: running statistics stay as loaded, affine params still train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn: LossFn, accelerator: Accelerator, *,
                freeze_bn: bool, memory_format: torch.memory_format, updates: int, desc: str, progress: bool,
                mixer: Mixer | None = None, on_update: Callable[[int, torch.Tensor], None] | None = None,
                epoch: int | None = None, skip: int = 0, sums: list[float] | None = None,
                on_step: Callable[[int, int, Callable[[], list[float]]], None] | None = None,
                ) -> tuple[float, float, int, int, list[float]]:
    """Train one epoch; returns (mean loss, top-1 on the un-mixed labels, images, updates, mean LR per group).

    ``mixer`` (timm ``Mixup``) turns labels into soft targets for the loss; ``on_update(updates, loss)``
    runs after every optimizer update (the EMA and the trackers hook in there; ``loss`` is the
    last batch's, still on the device). ``epoch`` goes to the sampler
    (the shuffled order is a function of it). Resuming mid-epoch: ``skip``
    batches are passed over without loading them (``accelerator.skip_first_batches``) and
    ``sums`` restores this process's running totals; ``on_step(batches_done, updates, get_sums)``
    runs after every batch (checkpoints are written from there).
    """
    model.train()
    if freeze_bn:
        freeze_bn_stats(model)
    groups = len(optimizer.param_groups)
    sums = list(sums) if sums else [0.0] * (3 + groups)
    total_loss = torch.tensor(sums[0], device=accelerator.device)
    correct = torch.tensor(sums[1], device=accelerator.device)
    seen, lr_sums = int(sums[2]), list(sums[3:])
    step = skip - 1
    if skip:  # a shard loader (finetune.data.shard_stream) skips by itself: it is no DataLoader
        batches = loader.skip(skip) if hasattr(loader, "skip") else accelerator.skip_first_batches(loader, skip)
    else:
        batches = loader
    if epoch is not None and hasattr(batches, "set_epoch"):
        # accelerate's loaders count their own epochs (from 0 in a resumed process) and pass that
        # count to the sampler at each iter(): set it, so the order is the epoch's own
        batches.set_epoch(epoch)
    # disable=None: tqdm stays silent when stderr is not a terminal (no \r lines in log files)
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, initial=skip, total=len(loader),
               disable=None if progress and accelerator.is_local_main_process else True)
    for step, (images, labels) in enumerate(bar, start=skip):
        images = images.contiguous(memory_format=memory_format)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
                loss = loss_fn(images, logits, targets)
            if not torch.isfinite(loss):
                raise FinetuneError(
                    f"loss became {loss.item()} at step {step} of {desc} (lr {optimizer.param_groups[0]['lr']:.2e}); "
                    "lower --lr, or use --mixed-precision no if fp16 overflowed"
                )
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            updates += 1
            scheduler.step_update(updates)
            if on_update is not None:
                on_update(updates, loss.detach())
        lr_sums = [acc + group["lr"] for acc, group in zip(lr_sums, optimizer.param_groups)]
        total_loss += loss.detach() * labels.size(0)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.size(0)
        if not bar.disable:  # .item() waits for the device; only pay it when a bar shows the value
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, updates, lambda: [total_loss.item(), correct.item(), float(seen), *lr_sums])
    totals = accelerator.reduce(torch.stack([total_loss, correct, torch.tensor(float(seen), device=accelerator.device)]),
                                reduction="sum")
    n = max(totals[2].item(), 1.0)
    mean_lrs = [acc / max(step + 1, 1) for acc in lr_sums]
    return totals[0].item() / n, totals[1].item() / n, int(totals[2].item()), updates, mean_lrs


@torch.no_grad()
def gather_logits(model: nn.Module, loader, accelerator: Accelerator, memory_format: torch.memory_format,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the whole loader, gathered across processes without padded duplicates (the
    training loop's validation pass; for predictions on image files see :func:`finetune.predict`). A loader
    marked ``padded`` (shards: :mod:`finetune.data.shard_stream`) pads with label ``PAD_LABEL``; those go."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, leave=False, disable=not (progress and accelerator.is_local_main_process)):
        images = images.contiguous(memory_format=memory_format)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    if getattr(loader, "padded", False):
        from finetune.data.shard_stream import PAD_LABEL

        keep = labels != PAD_LABEL
        logits, labels = logits[keep], labels[keep]
    return logits, labels
