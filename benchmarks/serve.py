"""Serving throughput and latency, with batching on and off.

    python benchmarks/serve.py [--models tiny gpt2-small] [--requests 2000 400] [--seconds 30]
        [--precision fp32|bf16] [--threads N] [--replicas N] [--concurrency 1 8 32]
        [--max-batch-size 32] [--high-throughput]

For each model (random weights) and batching on/off, the replicas (by default one, with
every core) serve ``POST /classify`` on 127.0.0.1; a load generator keeps 1, 8 and 32
requests in flight (persistent connections, corpus messages) for at most ``--requests`` requests or
``--seconds`` seconds. Prints a Markdown table: requests/s, p50/p95/p99 latency, errors,
and the batched/unbatched throughput ratio at each concurrency, beside the same ratio
measured in-process without HTTP (what batching can gain for the model on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from score import random_checkpoint

from spam_gpt.corpus import bundled_corpus_bytes, parse_collection
from spam_gpt.predictor import Predictor
from spam_gpt.server import deploy, use_high_throughput_ingress

CONCURRENCY = (1, 8, 32)
REQUEST_HEAD = (
    b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n"
)


async def keep_in_flight(
    port: int, texts: list[str], concurrency: int, requests: int, seconds: float
) -> tuple[list[float], int, float]:
    """``concurrency`` keep-alive connections, one request in flight on each, on one event
    loop: about 0.07 ms of client CPU per request against 0.24 ms for a thread per
    connection with ``http.client``, which on 2 cores took CPU from the server it measured."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + seconds

    async def connection(seed: int) -> None:
        nonlocal errors, issued
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline and issued < requests:
            issued += 1
            body = json.dumps({"text": rng.choice(texts)}).encode()
            started = time.perf_counter()
            writer.write(REQUEST_HEAD % len(body) + body)
            try:
                ok = await read_answer(reader) == 200
            except (OSError, asyncio.IncompleteReadError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(seed) for seed in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer with a Content-Length (as uvicorn sends); its status."""
    status_line = (await reader.readline()).split()
    if len(status_line) < 2:
        raise ConnectionResetError("the server closed the connection without an answer")
    status = int(status_line[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def load(port: int, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """Keep ``concurrency`` requests in flight; latencies in ms, errors counted."""
    latencies, errors, wall = asyncio.run(
        keep_in_flight(port, texts, concurrency, requests, seconds)
    )
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "rps": len(latencies) / wall,
        "p50": cuts[49],
        "p95": cuts[94],
        "p99": cuts[98],
        "errors": errors,
        "requests": len(latencies) + errors,
    }


def compute_ceiling(
    checkpoint: Path, texts: list[str], precision: str, batch: int, threads: int
) -> float:
    """In-process ms per message one at a time over ms per message in batches of ``batch``,
    with no HTTP at all and the replica's torch threads: the most batching can gain on this
    machine for this model."""
    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(str(checkpoint), precision=precision)
    sample = random.Random(0).choices(texts, k=4 * batch)
    predictor.predict(sample[:batch])  # warm-up

    def seconds_per_message(size: int) -> float:
        started = time.perf_counter()
        for at in range(0, len(sample), size):
            predictor.predict(sample[at : at + size])
        return (time.perf_counter() - started) / len(sample)

    return seconds_per_message(1) / seconds_per_message(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "gpt2-small"])
    parser.add_argument("--requests", type=int, nargs="+", default=[2000, 400])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads in the replica"
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--high-throughput", action="store_true", help="Serve's HAProxy ingress, as in serve"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spam-gpt-serve-bench-") as work:
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    """Every table row; ``work`` holds the checkpoints, removed at the end."""
    threads = args.threads
    texts = parse_collection(bundled_corpus_bytes())["Text"].tolist()
    print(
        f"{platform.machine()}, {threads} CPUs, torch {torch.__version__}, precision "
        f"{args.precision}, {'HAProxy' if args.high_throughput else 'default'} ingress, "
        f"at most {args.seconds:.0f} s per cell"
    )
    print(
        "| model | batching | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for name, requests in zip(args.models, args.requests):
        checkpoint = random_checkpoint(name, work)
        ceiling = compute_ceiling(checkpoint, texts, args.precision, args.max_batch_size, threads)
        rps = {}
        for batching in (True, False):
            port = 18000 + len(rps)
            app = {
                "model": str(checkpoint),
                "threads": threads,
                "replicas": args.replicas,
                "precision": args.precision,
                "max_batch_size": args.max_batch_size if batching else 1,
            }
            if args.high_throughput:
                use_high_throughput_ingress(address=None)
            deploy(app, "127.0.0.1", port, address=None)
            load(port, texts, 4, 20, 10)  # warm-up
            for concurrency in args.concurrency:
                cell = load(port, texts, concurrency, requests, args.seconds)
                rps[batching, concurrency] = cell["rps"]
                print(
                    f"| {name} | {'on' if batching else 'off'} | {concurrency} | "
                    f"{cell['requests']} | {cell['rps']:.1f} | {cell['p50']:.0f} | "
                    f"{cell['p95']:.0f} | {cell['p99']:.0f} | {cell['errors']} |",
                    flush=True,
                )
            ray.shutdown()
        ratios.append((name, [rps[True, c] / rps[False, c] for c in args.concurrency], ceiling))
    levels = ", ".join(str(c) for c in args.concurrency)
    print(
        f"\n| model | batched / unbatched req/s at concurrency {levels} | in-process, "
        f"{args.max_batch_size} messages per pass / one |\n|---|---|---|"
    )
    for name, values, ceiling in ratios:
        print(f"| {name} | {', '.join(f'{v:.2f}x' for v in values)} | {ceiling:.2f}x |")


if __name__ == "__main__":
    main()
