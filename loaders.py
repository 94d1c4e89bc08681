"""A training run's data: its splits decoded once into uint8 caches, their BatchLoaders on the training
device (one shard per rank under torchrun) and the BatchTransform that augments and normalises batches there."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import batches
import config as C
import data
import images
from augment import BatchTransform, augment_from_config
from common import UsageError
from distributed import Setup

DEMO_DATA = dict(num_classes=4, train_per_class=60, test_per_class=25)  # 240 train, 100 val images


@dataclass
class Data:
    """The decoded splits, their loaders and the batch transform (augmentation, normalisation)."""
    spec: data.DatasetSpec
    prep: images.Preprocess
    augment: dict | None
    erase: dict | None
    train: images.Decoded
    val: images.Decoded
    train_loader: batches.BatchLoader
    val_loader: batches.BatchLoader
    transform: BatchTransform



def load_data(cfg: C.Config, env: Setup) -> Data:
    """Decode each split once into uint8 tensors (cached); batches are augmented on the training device.
    Under torchrun each machine's local rank 0 makes the demo data and builds the decoded cache while the
    other ranks wait at the barrier; they then find everything in place and just open the cache."""
    r, t = cfg.run, cfg.train
    augment, erase = augment_from_config(cfg.augment)  # unknown augmentation names fail here, before decoding
    prep = images.preprocess_of(cfg.data)
    if env.ddp and env.local_rank != 0:
        dist.barrier()
    if r.demo and not r.resume:
        demo_root = Path(r.out) / "demo_data"
        if env.local_rank == 0:
            print(f"demo: making SYNTHETIC data (car-like drawings, not photos) in {demo_root}")
            r.data = str(data.make_demo_dataset(demo_root, seed=r.seed, **DEMO_DATA))
        else:
            r.data = str(demo_root)
    try:
        spec = data.find_dataset(r.data)
    except data.DataError as e:  # say where Stanford Cars goes, and that the demo needs no download
        raise UsageError(f"{e}. Put Stanford Cars there (README: 'Getting Stanford Cars'), "
                         f"or try: python train.py --demo") from None
    splits = data.make_splits(spec, val_split=cfg.data.val_split, seed=data.holdout_seed(cfg.flat()))
    train_records = data.subset(splits["train"], r.limit_train, r.seed)
    val_records = data.subset(splits["val"], r.limit_val, r.seed + 1) if cfg.data.validate else []
    val_name = ("val (held out of train)" if cfg.data.val_split else "val (= the official test split)"
                if cfg.data.validate else "val (--no-validate)")
    if spec.note:
        print(f"data: {spec.note}")
    print(f"data: {spec.root} ({spec.layout}), {len(spec.class_names)} classes, "
          f"{len(train_records)} train, {len(val_records)} {val_name}")
    train_data = images.decode_cached(train_records, prep.for_training(cfg.data.train_decode_scale),
                                      cache_dir=r.cache_dir, workers=r.workers, desc="train")
    val_data = (images.decode_cached(val_records, prep, cache_dir=r.cache_dir, workers=r.workers, desc="val")
                if val_records else images.Decoded(torch.empty(0, prep.channels, *prep.hw, dtype=torch.uint8),
                                                   torch.empty(0, dtype=torch.long), []))
    if env.ddp and env.local_rank == 0:
        dist.barrier()
    if len(train_data.labels) == 0 or (cfg.data.validate and len(val_data.labels) == 0):
        raise UsageError(f"{r.data}: no readable training or validation images; check the dataset folder")
    drop_last = len(train_data.labels) > t.batch_size  # a last batch of 1 would break BatchNorm
    if env.ddp:
        # every rank must make the same number of steps (each step all-reduces gradients): always drop the tail
        drop_last = True
        if len(train_data.labels) // env.world < t.batch_size:
            raise UsageError(f"{len(train_data.labels)} training images give each of the {env.world} ranks fewer "
                             f"than --batch-size {t.batch_size} (a per-rank batch); lower --batch-size")
    # under torchrun each rank reads its own shard: the same (seed, epoch) permutation, positions rank::world;
    # validation is sharded without padding, and its sums are all-reduced, so each image counts once
    shard = dict(device=env.device, seed=r.seed, rank=env.rank, world_size=env.world)
    train_loader = batches.BatchLoader(train_data, t.batch_size, shuffle=True, drop_last=drop_last, **shard)
    val_loader = batches.BatchLoader(val_data, t.batch_size, shuffle=False, drop_last=False, **shard)
    return Data(spec, prep, augment, erase, train_data, val_data, train_loader, val_loader,
                BatchTransform(prep, augment, erase, out_hw=prep.hw))
