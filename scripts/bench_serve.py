"""Throughput and latency of `flux2-accel serve`, driven by the OpenAI SDK from several client threads.

    python scripts/bench_serve.py [--requests 16] [--concurrency 4] [--size 256] [--steps 20]
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --model flux2-dev [--key-env FLUX2_ACCEL_API_KEY]

Without --url it deploys the tiny demo model on a local Ray (loopback) three times, one after the other, and drives
each with the same requests (distinct prompts, so the text encoder's cache answers none):
  1 replica           one Generator replica, the text encoder batching (max_batch_size 8)
  2 replicas          two Generator replicas, batching
  2 replicas, no batch   two replicas, the text encoder taking one prompt per call (max_batch_size 1)
For each: requests per second, p50/p95 latency, failures by status, and the text encoder's calls per request (its
batches / requests, from the server's /v1/flux2-accel/stats), with the throughput ratio to 1 replica, in one run.
With --url it drives a running server once (any model it serves), which is what the GPU device check runs.
Bounded: at most --requests requests (1000 at most) and --time-limit seconds; the clients are threads here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
from flux2_accel.optim.serve.ray_serve import config as serve_config
from flux2_accel.optim.serve.ray_serve import launcher

MAX_REQUESTS = 1000
MAX_CONCURRENCY = 64


def stats(url: str, key: str | None) -> dict:
    request = urllib.request.Request(url + "/v1/flux2-accel/stats",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def encoder_counts(url: str, key: str | None) -> Counter:
    total = Counter()
    for counts in stats(url, key)["text_encoders"].values():
        total.update(counts)
    return total


def drive(url: str, key: str | None, model: str, requests: int, concurrency: int, size: int, steps: int,
          time_limit: float) -> dict:
    """`requests` image generations from `concurrency` threads; what came back, and the text encoder's counts."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=time_limit)
    deadline = time.monotonic() + time_limit
    before = encoder_counts(url, key)
    latencies, statuses, lock = [], Counter(), threading.Lock()

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            with lock:
                statuses["not sent (time limit)"] += 1
            return
        start = time.perf_counter()
        try:
            client.images.generate(model=model, prompt=f"bench prompt {i} {time.time_ns()}", size=f"{size}x{size}",
                                   extra_body={"steps": steps, "seed": i})
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        except openai.APIError as e:
            status = type(e).__name__
        with lock:
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    after = encoder_counts(url, key)
    done = len(latencies)
    quantiles = statistics.quantiles(latencies, n=20, method="inclusive") if done >= 2 else latencies * 19
    return {"requests": requests, "completed": done, "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": seconds, "rps": done / seconds if seconds else 0.0,
            "p50_s": statistics.median(latencies) if latencies else None,
            "p95_s": quantiles[18] if quantiles else None,
            "encoder_prompts": after["prompts"] - before["prompts"],
            "encoder_calls": after["batches"] - before["batches"],
            "encoder_calls_per_request": (after["batches"] - before["batches"]) / done if done else None}


def local_rounds(args) -> list[tuple[str, dict]]:
    results = []
    for label, replicas, batch in (("1 replica", 1, 8), ("2 replicas", 2, 8), ("2 replicas, no batching", 2, 1)):
        config = serve_config.demo_config(replicas, port=args.port, max_queued_requests=args.requests)
        encoder = config.text_encoders[serve_config.DEMO_TEXT_ENCODER]
        config = replace(config, text_encoders={encoder.name: replace(encoder, max_batch_size=batch,
                                                                      batch_wait_timeout_s=0.02)})
        deployed = launcher.deploy(config, num_cpus=args.num_cpus, log_to_driver=False)
        try:
            drive(deployed.url, None, serve_config.DEMO_MODEL, 2 * replicas, replicas, args.size, args.steps,
                  args.time_limit)  # warm-up: every replica has run once
            results.append((label, drive(deployed.url, None, serve_config.DEMO_MODEL, args.requests,
                                         args.concurrency, args.size, args.steps, args.time_limit)))
        finally:
            launcher.undeploy(deployed.app_name)
    return results


def table(results: list[tuple[str, dict]]) -> str:
    base = results[0][1]["rps"] or None
    rows = ["| setup | completed | failures | req/s | vs first | p50 s | p95 s | encoder calls / request |",
            "|---|---|---|---|---|---|---|---|"]
    for label, r in results:
        failures = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items() if k != "200") or "none"
        ratio = f"{r['rps'] / base:.2f}x" if base else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"| {label} | {r['completed']}/{r['requests']} | {failures} | {r['rps']:.2f} | {ratio} | "
                    f"{fmt(r['p50_s'])} | {fmt(r['p95_s'])} | {fmt(r['encoder_calls_per_request'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: deploy the demo on a local Ray, three setups)")
    p.add_argument("--model", default="flux2-demo", help="with --url: the model to ask for")
    p.add_argument("--key-env", default="FLUX2_ACCEL_API_KEY", help="with --url: the environment variable of the key")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per setup; later requests are not sent")
    p.add_argument("--port", type=int, default=8000, help="without --url: the local server's port")
    p.add_argument("--num-cpus", type=int, default=None, help="without --url: CPUs the local Ray may schedule")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        p.error(f"--requests is 1..{MAX_REQUESTS} and --concurrency 1..{MAX_CONCURRENCY}")
    if args.url:
        url = args.url.rstrip("/")
        results = [(url, drive(url, os.environ.get(args.key_env), args.model, args.requests, args.concurrency,
                               args.size, args.steps, args.time_limit))]
    else:
        results = local_rounds(args)
    print(json.dumps(dict(results), indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
