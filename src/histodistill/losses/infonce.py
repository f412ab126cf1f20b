"""MoCo-style contrastive term: a FIFO queue of keys and the InfoNCE loss against it.

The queue holds ``size`` keys of dimension ``dim``. Each step the query is scored against its own
key (the positive) and every key in the queue (the negatives); the loss is the cross-entropy with
the positive at index 0 (He et al. 2020, used by MoMA with K = 16384, τ = 0.15).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world_size · B, ...) in rank order; the tensor itself on one process.

    Used to enqueue the keys of every rank, so all ranks hold the same queue. No gradient flows
    through it (queue entries are constants).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return torch.cat(gathered, dim=0)


class MoCoQueue(nn.Module):
    """FIFO queue of keys (K, D), filled with wrap-around; starts as random unit vectors.

    Stored as buffers so it is saved in checkpoints and moves with the module's device.
    """

    queue: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, dim: int, size: int = 16384) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """keys (N, D) replace the N oldest entries, wrapping around the end of the queue."""
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size}: raise the queue size")
        slots = (self.pointer + torch.arange(n, device=keys.device)) % self.size  # (N,)
        self.queue[slots] = keys.detach().to(self.queue.dtype)
        self.pointer.copy_((self.pointer + n) % self.size)


def infonce_logits(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """query (B, D), positive key (B, D), queue (K, D) -> logits (B, 1 + K) = [q·k⁺, q·queueᵀ] / τ."""
    positive = (query * key).sum(dim=1, keepdim=True)  # (B, 1)
    negative = query @ queue.detach().t()  # (B, K)
    return torch.cat([positive, negative], dim=1) / temperature


def infonce_loss(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of `infonce_logits` with the positive (index 0) as the target."""
    logits = infonce_logits(query, key, queue, temperature)
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, target)
