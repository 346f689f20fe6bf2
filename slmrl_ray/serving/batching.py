"""Request batching for the model deployments: the next batch forms when the model is free.

Ray Serve's `@serve.batch` forms a batch as soon as its wait ends and only then queues it
behind the batch that is running (`ray.serve.batching._BatchQueue._process_batches` in Ray
2.60). With a model that takes a second per batch, a burst of 32 requests therefore ran as
13 batches of 1 to 18 (SmolLM2-135M on 2 cores: 1.7 requests/s, barely above one at a
time). `Coalescer` forms each batch when the previous one is done, from everything that
arrived meanwhile (up to `max_batch_size`): the same burst runs as batches of 32.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class Coalescer:
    """`await coalescer(item)` returns `run(batch)[i]` for the batch its item went into.

    One batch runs at a time. A batch forms once the previous one has finished: after
    `wait_s` (for a burst to arrive) unless `max_batch_size` items are already waiting. A
    caller that stopped waiting (cancelled) before its batch formed is left out of it.
    """

    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.arrived: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.arrived is None:
            self.arrived = asyncio.Event()
        future = loop.create_future()
        self.pending.append((item, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while True:
            await self.arrived.wait()
            if len(self.pending) < self.max_batch_size and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size:]
            if not self.pending:
                self.arrived.clear()
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 (every caller of the batch gets it)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
