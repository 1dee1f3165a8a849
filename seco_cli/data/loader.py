"""Training batches whose randomness derives from (seed, iteration, slot) — SPEC §3.8.

Global sample position ``g = iteration * batch + slot``; the image is taken from a per-epoch
permutation drawn from ``(seed, epoch)`` and augmented with ``(seed, iteration, slot)``, so a
run is reproducible, resumable at any iteration and independent of the number of workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from seco_cli.data.prepared import PreparedDataset
from seco_cli.data.transforms import to_tensor, train_crop


class TrainSamples(Dataset):
    def __init__(self, data: PreparedDataset, ids: list[str], batch_size: int, seed: int, crop: int,
                 scale_range: tuple[float, float], mean, std, with_masks: bool = False):
        self.data, self.ids = data, ids
        self.batch_size, self.seed, self.crop = batch_size, seed, crop
        self.scale_range, self.mean, self.std = scale_range, mean, std
        self.with_masks = with_masks
        self._perm: dict[int, np.ndarray] = {}

    def _image_index(self, g: int) -> int:
        n = len(self.ids)
        epoch = g // n
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(n)}
        return int(self._perm[epoch][g % n])

    def __len__(self) -> int:  # positions are unbounded; the sampler decides the range
        return 2**62

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        iteration, slot = divmod(g, self.batch_size)
        image_id = self.ids[self._image_index(g)]
        rng = np.random.default_rng([self.seed, iteration, slot])
        image = to_tensor(self.data.image(image_id), self.mean, self.std)
        mask = None
        if self.with_masks:
            mask = torch.from_numpy(self.data.mask(image_id).astype(np.int64))
        x, valid, mask, _ = train_crop(image, rng, self.crop, self.scale_range, mask)
        item = {"image": x, "valid": valid,
                "labels": torch.from_numpy(self.data.label_vector(image_id)),
                "index": torch.tensor(g)}
        if mask is not None:
            item["mask"] = mask
        return item


def train_loader(samples: TrainSamples, start_iteration: int, iterations: int,
                 num_workers: int) -> DataLoader:
    b = samples.batch_size
    positions = range(start_iteration * b, iterations * b)
    return DataLoader(samples, batch_size=b, sampler=positions, num_workers=num_workers,
                      drop_last=False, persistent_workers=False)
