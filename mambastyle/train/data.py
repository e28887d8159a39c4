"""Real training images streamed from the prepare stage's WebDataset shards.

Each training worker (rank) reads its own part of the shards the manifest lists, straight
from local disk or S3 through the storage module, as an endless, deterministic stream:
epoch ``e`` visits the shards in an order drawn from ``(seed, e)`` and shuffles samples
through a bounded buffer drawn from ``(seed, e, rank)``. Position ``n`` (samples consumed)
therefore identifies the stream's state, which is all a checkpoint needs to resume it:
whole epochs are skipped by arithmetic on the manifest's counts, the current one by
re-reading the raw bytes without decoding them.

With at least as many shards as ranks, each rank reads a disjoint set of shards per epoch;
otherwise every rank reads all shards and keeps every ``world``-th sample.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator

import torch

from mambastyle.data.shards import ShardError, ShardInfo, check_feeds, decode_png, read_shard
from mambastyle.storage import StorageOptions


class ShardStream:
    """Endless, deterministic, resumable stream of one rank's samples (see the module doc)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 64,
        options: StorageOptions | None = None,
    ):
        check_feeds(shards, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.shards, self.rank, self.world, self.seed = list(shards), rank, world, seed
        self.shuffle_buffer, self.options = max(1, shuffle_buffer), options
        self.by_shard = len(shards) >= world

    def _plan(self, epoch: int) -> list[ShardInfo]:
        order = list(self.shards)
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order[self.rank :: self.world] if self.by_shard else order

    def epoch_length(self, epoch: int) -> int:
        plan = self._plan(epoch)
        total = sum(s.samples for s in plan)
        return total if self.by_shard else (total - self.rank + self.world - 1) // self.world

    def _raw_epoch(self, epoch: int) -> Iterator[tuple[str, str, bytes]]:
        """(shard uri, key, png) of this rank's samples in epoch order (shuffled, not decoded)."""
        rng = random.Random(f"samples/{self.seed}/{epoch}/{self.rank}")
        buffer: list[tuple[str, str, bytes]] = []
        index = 0
        for shard in self._plan(epoch):
            for key, png in read_shard(shard.uri, self.options):
                mine = self.by_shard or index % self.world == self.rank
                index += 1
                if not mine:
                    continue
                buffer.append((shard.uri, key, png))
                if len(buffer) >= self.shuffle_buffer:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def samples(self, start: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, (3, H, W) uint8) from sample position ``start`` on, forever."""
        epoch = 0
        while start >= self.epoch_length(epoch):
            start -= self.epoch_length(epoch)
            epoch += 1
        size = None
        while True:
            n = 0
            for i, (uri, key, png) in enumerate(self._raw_epoch(epoch)):
                n += 1
                if i < start:
                    continue
                img = decode_png(png, f"{uri}: {key}")
                if size is None:
                    size = img.shape
                elif img.shape != size:
                    raise ShardError(f"{uri}: {key} is {tuple(img.shape)}, other samples {tuple(size)}")
                yield key, img
            if n != self.epoch_length(epoch):
                raise ShardError(
                    f"the shards hold {n} samples for rank {self.rank} in epoch {epoch}, "
                    f"the manifest says {self.epoch_length(epoch)}"
                )
            start, epoch = 0, epoch + 1

    def batches(self, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        """(batch_size, 3, H, W) uint8 batches from sample position ``start`` on."""
        it = self.samples(start)
        while True:
            yield torch.stack([next(it)[1] for _ in range(batch_size)])


def tensor_batches(
    images: torch.Tensor, batch_size: int, start: int = 0, seed: int = 0
) -> Iterator[torch.Tensor]:
    """The in-memory twin of :meth:`ShardStream.batches`: (N, 3, H, W) uint8 images,
    reshuffled every epoch from ``(seed, epoch)``, resumable from sample position ``start``."""
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images")
    orders: dict[int, torch.Tensor] = {}

    def order(epoch: int) -> torch.Tensor:
        if epoch not in orders:
            orders.clear()  # only the current (and next) epoch are ever needed
            orders[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            )
        return orders[epoch]

    position = start
    while True:
        picks = [int(order(p // n)[p % n]) for p in range(position, position + batch_size)]
        position += batch_size
        yield images[picks]


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead (reading and decoding
    overlap the training step). Errors are re-raised in the consumer; ``close()`` stops it."""

    _END = object()

    def __init__(self, make: Callable[[], Iterator], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator]) -> None:
        try:
            for item in make():
                if not self._put((None, item)):
                    return
            self._put((None, self._END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((exc, None))

    def __iter__(self):
        return self

    def __next__(self):
        exc, item = self._queue.get()
        if exc is not None:
            raise exc
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
