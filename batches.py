"""Batches of decoded images on the training device: BatchLoader reads a Decoded split (a memory-mapped
uint8 cache) in a seeded order, one shard per rank under torchrun, and prepares the next batch on a thread
while the device works on this one."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data import DataError
from images import Decoded


class BatchLoader:
    """Batches of uint8 images from a Decoded set, moved to `device`; the next batch is gathered in a background
    thread (into pinned memory on CUDA) while the current one trains. Order depends only on (seed, epoch)."""

    def __init__(self, decoded: Decoded, batch_size: int, shuffle: bool, drop_last: bool,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        """rank / world_size shard the set for DistributedDataParallel: every rank draws the same (seed, epoch)
        permutation and takes its positions rank::world_size. With drop_last the tail that doesn't split evenly
        is dropped first, so every rank makes the same number of steps; without it nothing is padded or
        repeated (ranks may differ by one image), so a distributed evaluation counts each image exactly once."""
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"BatchLoader: rank {rank} must lie in [0, world_size={world_size})")
        self.decoded, self.batch_size, self.shuffle, self.drop_last = decoded, batch_size, shuffle, drop_last
        self.device, self.seed, self.epoch, self.start_batch = torch.device(device), seed, 0, 0
        self.rank, self.world_size = rank, world_size
        self.pin = self.device.type == "cuda"

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """start_batch > 0 skips the epoch's first batches: the rest of the same order, for a run that
        resumes inside an epoch. len() stays the whole epoch's."""
        self.epoch, self.start_batch = epoch, start_batch

    def _shard_size(self) -> int:
        n, w = len(self.decoded), self.world_size
        if self.drop_last:
            return n // w
        return len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.decoded)
        if not self.shuffle:
            order = np.arange(n)
        else:
            ss = np.random.SeedSequence([self.seed, self.epoch])
            order = np.random.default_rng(ss).permutation(n)
        if self.world_size > 1:  # the same permutation on every rank; each takes its own positions
            if self.drop_last:
                order = order[:(n // self.world_size) * self.world_size]
            order = order[self.rank::self.world_size]
        return order

    def _gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)  # sequential reads from the memmap; the order inside a batch does not matter
        imgs = self.decoded.images
        if isinstance(imgs, torch.Tensor):
            x = imgs[torch.from_numpy(idx)]
        else:
            x = torch.from_numpy(np.ascontiguousarray(imgs[idx]))
        y = self.decoded.labels[torch.from_numpy(idx)]
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self):
        order = self._order()
        bs, n = self.batch_size, len(order)
        stops = range(0, (n // bs) * bs if self.drop_last else n, bs)
        batches = [order[s:s + bs] for s in stops][self.start_batch:]
        if not batches:
            return
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(self._gather, batches[0])
            for k in range(len(batches)):
                x, y = fut.result()
                if k + 1 < len(batches):
                    fut = ex.submit(self._gather, batches[k + 1])
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
