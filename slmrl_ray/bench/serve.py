"""`slmrl-ray bench serve`: the Ray Serve application against the naive one-process server.

    slmrl-ray bench serve --registry ~/slmrl_ray_results/tiny-grid \\
        --cell pythia-70m/tinystories --out serve_bench.json
    python -m slmrl_ray.bench.serve ...     (the same)

For each server in turn (never both at once: they share the CPU), completions
(`max_tokens` new tokens, sampled) and rewards (one pair per request) are sent at
concurrency 1, 8 and 32; printed: requests/s and p50/p99 latency, and the Serve/naive
ratios. Figures are for the machine it runs on, which the JSON records with the settings.
The naive server is `bench.naive`; the Ray side is `serving.launch.local_app`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

from slmrl_ray.bench.common import format_table, machine

CONCURRENCY = (1, 8, 32)
PROMPT = "Once upon a time, a little girl named Lily"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _drive(url: str, body: dict, requests: int, concurrency: int, stream: bool = False) -> dict:
    """`requests` POSTs, `concurrency` at a time; with `stream`, each streamed (`"stream": true`)
    and the time to its first piece of text recorded too."""
    import httpx

    latencies: list[float] = []
    first_pieces: list[float] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as session:
        async def one() -> None:
            nonlocal failures
            async with gate:
                started = time.perf_counter()
                if not stream:
                    response = await session.post(url, json=body)
                else:
                    first = None
                    async with session.stream("POST", url, json={**body, "stream": True}) as response:
                        async for line in response.aiter_lines():
                            choices = json.loads(line[6:]).get("choices") if line.startswith("data: {") else None
                            if first is None and choices and choices[0].get("text"):
                                first = time.perf_counter() - started
                    if first is not None:
                        first_pieces.append(first)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        wall = time.perf_counter() - started
    result = {"requests": requests, "concurrency": concurrency, "failures": failures,
              "throughput_rps": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
              "p99_ms": 1000 * _percentile(latencies, 0.99)}
    if first_pieces:
        result.update(ttft_p50_ms=1000 * statistics.median(first_pieces),
                      ttft_p99_ms=1000 * _percentile(first_pieces, 0.99))
    return result


def _measure(base: str, model: str | None, reward: str | None, args, streams: bool = False) -> dict:
    """Completions and rewards at each concurrency; with `streams` (a server that streams), the
    completions once more, streamed, for the time to first token."""
    completion = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 1.0}
    rewards = {"pairs": [{"prompt": PROMPT, "response": " who loved to play in the park."}]}
    if model:
        completion["model"], rewards["model"] = model, reward
    results = {}
    for route, body, count in (("completions", completion, args.completions), ("rewards", rewards, args.rewards)):
        asyncio.run(_drive(f"{base}/v1/{route}", body, 4, 4))  # warm-up: models loaded, caches filled
        results[route] = [asyncio.run(_drive(f"{base}/v1/{route}", body, count, c)) for c in CONCURRENCY]
    if streams:
        results["completions_streamed"] = [asyncio.run(_drive(f"{base}/v1/completions", completion, args.completions,
                                                              c, stream=True)) for c in CONCURRENCY]
    return results


def _wait_ready(url: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def bench_naive(policy_uri: str, reward_uri: str, args) -> dict:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "slmrl_ray.bench.naive", "--policy", policy_uri,
                               "--reward", reward_uri, "--port", str(port)])
    try:
        _wait_ready(f"http://127.0.0.1:{port}/docs")
        return _measure(f"http://127.0.0.1:{port}", None, None, args)
    finally:
        server.terminate()
        server.wait()


def bench_serve(cell: str, args) -> dict:
    from slmrl_ray.serving.launch import local_app

    port = _free_port()
    app_args = {"registry": args.registry, "cells": [cell], "stages": ["ppo"], "device": "cpu",
                "policy": {"num_replicas": args.policy_replicas, "num_cpus": 0.5, "max_ongoing_requests": 64,
                           "max_queued_requests": 1024, "max_batch_size": 32},
                "reward": {"num_cpus": 0.5, "max_batch_size": 32, "max_ongoing_requests": 64,
                           "max_queued_requests": 1024},
                "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 256, "max_queued_requests": 1024}}
    with local_app(app_args, port) as url:
        return _measure(url, f"ppo/{cell}", f"reward/{cell}", args, streams=True)


def comparison_rows(naive: dict, served: dict) -> list[dict]:
    """One row per route and concurrency: both servers' rates and latencies, formatted for the
    table. Time to first token: Serve's from its streamed run; the naive server does not
    stream, so its first token comes with its whole answer (its latency)."""
    rows = []
    streamed = served.get("completions_streamed") or [None] * len(CONCURRENCY)
    for route in ("completions", "rewards"):
        for base, ours, stream in zip(naive[route], served[route], streamed):
            row = {
                "route": route, "concurrency": base["concurrency"],
                "naive req/s": f"{base['throughput_rps']:.1f}", "Serve req/s": f"{ours['throughput_rps']:.1f}",
                "ratio": f"{ours['throughput_rps'] / base['throughput_rps']:.2f}x",
                "naive p50/p99 ms": f"{base['p50_ms']:.0f}/{base['p99_ms']:.0f}",
                "Serve p50/p99 ms": f"{ours['p50_ms']:.0f}/{ours['p99_ms']:.0f}",
                "naive / Serve TTFT p50 ms": "",
            }
            if route == "completions" and stream is not None and "ttft_p50_ms" in stream:
                row["naive / Serve TTFT p50 ms"] = f"{base['p50_ms']:.0f} / {stream['ttft_p50_ms']:.0f}"
            rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry.json, or an experiment folder or URI")
    parser.add_argument("--cell", default="pythia-70m/tinystories")
    parser.add_argument("--completions", type=int, default=64, help="completion requests per concurrency level")
    parser.add_argument("--rewards", type=int, default=256, help="reward requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policy-replicas", type=int, default=1)
    parser.add_argument("--out", default="serve_bench.json")


def run(args: argparse.Namespace) -> int:
    from slmrl_ray.serving.config import build_catalog, parse_args

    catalog = build_catalog(parse_args({"registry": args.registry, "cells": [args.cell], "stages": ["ppo"]}))
    naive = bench_naive(catalog[f"ppo/{args.cell}"].stage_uri, catalog[f"reward/{args.cell}"].stage_uri, args)
    served = bench_serve(args.cell, args)
    print(format_table(comparison_rows(naive, served)))
    settings = {key: value for key, value in vars(args).items() if key not in ("command", "target", "func")}
    recorded = machine()
    with open(args.out, "w") as handle:
        json.dump({"machine": recorded, "settings": settings, "naive": naive, "serve": served}, handle, indent=2)
    print(f"\n{recorded}\nwritten: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray Serve vs a naive one-process server")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
