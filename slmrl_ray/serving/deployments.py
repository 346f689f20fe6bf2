"""The model deployments of the Serve application (`serving.app` composes them behind its ingress).

- `PolicyDeployment` hosts the SFT and PPO policies of many cells with Serve's model
  multiplexing (`ppo/pythia-70m/tinystories` is a multiplexed model id; each replica keeps
  an LRU of `policy.max_models_per_replica` loaded policies, and Serve routes a request to a
  replica that already holds its model), and batches concurrent requests into one
  `generate` call (`serving.batching.Coalescer`), whole or streamed;
- `RewardDeployment` scores (prompt, response) pairs, batched the same way per reward model.
"""

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import asdict

from ray import serve

from slmrl_ray.serving.batching import Coalescer
from slmrl_ray.serving.config import ServedModel


@serve.deployment
class PolicyDeployment:
    """Generates from multiplexed policies; the model id comes with each request.

    Requests for the same policy that arrive together share one `generate` call
    (`Coalescer`), whatever their sampling settings; each row stops on its own (EOS, its
    stop strings, its max_tokens), and a seeded request draws from a generator of its own,
    so its seed alone decides its sample.
    """

    def __init__(self, models: dict[str, dict], device: str, max_prompt_tokens: int, max_models: int,
                 max_batch_size: int, batch_wait_timeout_s: float, token_delay_s: float = 0.0) -> None:
        from slmrl_ray.serving.runners import PolicyRunner

        catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}

        self.tokens_generated = 0  # every row of every call: a live counter (cancelled rows stop adding)
        counting = threading.Lock()

        def count(tokens: int) -> None:  # on a generating thread, once per decoding step
            with counting:
                self.tokens_generated += tokens
            if token_delay_s:
                time.sleep(token_delay_s)

        async def load(model_id: str):  # a plain function: Serve keeps its LRU on it
            runner = await asyncio.to_thread(PolicyRunner, catalog[model_id], device, max_prompt_tokens)
            runner.on_tokens = count
            return runner

        self.batch_sizes: list[int] = []

        async def generate_batch(items: list[tuple]) -> list[tuple]:
            self.batch_sizes.append(len(items))
            groups: dict[int, list[int]] = {}  # one generate call per policy, whatever the settings
            for index, (runner, _) in enumerate(items):
                groups.setdefault(id(runner), []).append(index)
            results: dict[int, tuple] = {}
            for rows in groups.values():
                runner = items[rows[0]][0]
                outputs = await asyncio.to_thread(runner.complete_batch, [items[i][1] for i in rows])
                results.update(zip(rows, outputs))
            return [results[i] for i in range(len(items))]

        self._runner = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self._generate = Coalescer(generate_batch, max_batch_size, batch_wait_timeout_s)

    async def _accept(self, prompt: str | None, messages: list[dict] | None, sampling: dict, **streaming):
        """The runner and the `Request` (its prompt tokenised once, here); a `RequestError` when
        the prompt cannot be served."""
        from slmrl_ray.serving.runners import Request, Sampling

        runner = await self._runner(serve.get_multiplexed_model_id())
        text = prompt if messages is None else runner.format_chat(messages)
        return runner, Request(runner.check_prompt(text), Sampling(**sampling), **streaming)

    async def complete(self, prompt: str | None, messages: list[dict] | None, sampling: dict) -> dict:
        from slmrl_ray.serving.runners import RequestError

        cancel = threading.Event()
        try:
            runner, request = await self._accept(prompt, messages, sampling, cancel=cancel)
            choices, prompt_tokens = await self._generate((runner, request))
        except RequestError as failure:
            return {"error": str(failure), "param": failure.param}
        except asyncio.CancelledError:  # the caller timed out or went away: free the batch slot
            cancel.set()
            raise
        return {"choices": [asdict(c) for c in choices], "prompt_tokens": prompt_tokens}

    async def complete_stream(self, prompt: str | None, messages: list[dict] | None, sampling: dict):
        """Streams a completion as it is generated, inside the same batches as `complete`:
        first `{"prompt_tokens"}` (or `{"error"}`), then `{"pieces": [[choice, text], ...]}` as
        rows decode, then `{"choices": [{finish_reason, completion_tokens}, ...]}`. When the
        caller stops listening (a client that disconnected), the request's rows end."""
        from slmrl_ray.serving.runners import RequestError

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_piece(choice: int, piece: str) -> None:  # on the generating thread
            loop.call_soon_threadsafe(queue.put_nowait, [choice, piece])

        try:
            runner, request = await self._accept(prompt, messages, sampling, on_piece=on_piece, cancel=cancel)
        except RequestError as failure:
            yield {"error": str(failure), "param": failure.param}
            return
        task = asyncio.ensure_future(self._generate((runner, request)))
        try:
            yield {"prompt_tokens": len(request.prompt_ids)}
            while not (task.done() and queue.empty()):
                if queue.empty():
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    pieces = [getter.result()]
                else:
                    pieces = []
                while not queue.empty():
                    pieces.append(queue.get_nowait())
                yield {"pieces": pieces}
            choices, _ = task.result()
            yield {"choices": [{"finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}
                               for c in choices]}
        finally:
            if not task.done():  # the stream was abandoned: its rows stop at the next step
                cancel.set()

    def batch_stats(self) -> dict:
        return {**_batch_stats(self.batch_sizes), "tokens_generated": self.tokens_generated}


@serve.deployment
class RewardDeployment:
    """Scores pairs; pairs of concurrent requests are batched (`Coalescer`) per reward model."""

    def __init__(self, models: dict[str, dict], device: str, max_models: int, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        from slmrl_ray.serving.runners import RewardRunner

        catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}
        runners: OrderedDict = OrderedDict()
        self.batch_sizes: list[int] = []

        def runner_for(model_id: str) -> RewardRunner:
            if model_id not in runners:
                if len(runners) >= max_models:
                    runners.popitem(last=False)
                runners[model_id] = RewardRunner(catalog[model_id], device, max_batch_size)
            runners.move_to_end(model_id)
            return runners[model_id]

        async def score_batch(items: list[tuple[str, str, str]]) -> list[float]:
            self.batch_sizes.append(len(items))
            scores: dict[int, float] = {}
            for model_id in dict.fromkeys(item[0] for item in items):
                rows = [i for i, item in enumerate(items) if item[0] == model_id]
                runner = await asyncio.to_thread(runner_for, model_id)
                values = await asyncio.to_thread(
                    runner.score, [items[i][1] for i in rows], [items[i][2] for i in rows])
                scores.update(zip(rows, values))
            return [scores[i] for i in range(len(items))]

        self._score_one = Coalescer(score_batch, max_batch_size, batch_wait_timeout_s)

    async def score(self, model_id: str, prompts: list[str], responses: list[str]) -> list[float]:
        return list(await asyncio.gather(*(self._score_one((model_id, p, r)) for p, r in zip(prompts, responses))))

    def batch_stats(self) -> dict:
        return _batch_stats(self.batch_sizes)


def _batch_stats(sizes: list[int]) -> dict:
    """How full the batches were (this replica): count and largest."""
    return {"batches": len(sizes), "max_batch_size": max(sizes, default=0)}
