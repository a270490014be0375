"""Serving load: Poisson arrivals against `pyengine serve` on localhost, in vLLM's serving-benchmark columns.

    python bench/bench_serve.py --weights DIR [--backend gloo] --num-prompts 64 --request-rate 4
    python bench/bench_serve.py --url http://127.0.0.1:8000 --num-prompts 64 --request-rate inf

A bounded, seeded load: `--num-prompts` requests, arrival gaps drawn from an exponential of mean
1/rate (inf: all at once), prompt and output lengths uniform in [len * (1 - r), len * (1 + r)]
(r = --range-ratio), prompt ids uniform over the vocabulary, every request streamed with
ignore_eos so it makes exactly its output length. Without --url the benchmark starts the server on
a free loopback port and stops it afterwards. Prints a table and, with --json FILE, appends one JSON
line with the row and its provenance (machine, date, commit, command). A server on CPU checks the
engine's serving path (scheduling, batching, streaming); its figures say nothing about GPU speed,
and the row says so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

CPU_NOTE = "CPU server: checks the engine's serving path, not GPU speed"


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    output_len: int = 0
    """New ids received."""
    ok: bool = False
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive streamed ids (a chunk of k ids counts k - 1 zero gaps)."""
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """vLLM's serving-benchmark figures of one run (times in ms, rates per second)."""
    done = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [(r.latency_s - r.ttft_s) * 1e3 / (r.output_len - 1) for r in done if r.output_len > 1]
    itl = [g * 1e3 for r in done for g in r.itl_s]
    inputs, outputs = sum(r.prompt_len for r in done), sum(r.output_len for r in done)
    row = {"completed": len(done), "failed": len(results) - len(done), "duration": duration_s,
           "total_input_tokens": inputs, "total_output_tokens": outputs,
           "request_throughput": len(done) / duration_s, "output_throughput": outputs / duration_s,
           "total_token_throughput": (inputs + outputs) / duration_s}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        row[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        row[f"median_{name}_ms"] = percentile(values, 50)
        row[f"p99_{name}_ms"] = percentile(values, 99)
    return row


def workload(n: int, rate: float, input_len: int, output_len: int, ratio: float, vocab: int,
             seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival time in s, prompt ids, output length) per request, a function of the seed."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return rng.randint(max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio))))

    t, out = 0.0, []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(length(input_len))]  # 0-2: pad, bos, eos
        out.append((t, prompt, length(output_len)))
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return out


def one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    res = RequestResult(len(prompt))
    parts = urllib.parse.urlsplit(url)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            res.error = f"HTTP {reply.status}: {reply.read()[:200]!r}"
            return res
        last = None
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            ids = event["choices"][0].get("token_ids", []) if event.get("choices") else []
            if not ids:
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            res.itl_s += [0.0] * (len(ids) - 1)  # ids that came in one event came together
            last = now
            res.output_len += len(ids)
        res.latency_s = time.perf_counter() - start
        res.ok = res.output_len == max_tokens
        res.error = "" if res.ok else f"{res.output_len} of {max_tokens} ids"
    except OSError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def run_load(url: str, model: str, requests: list[tuple[float, list[int], int]]) -> tuple[list[RequestResult], float]:
    results: list[RequestResult | None] = [None] * len(requests)

    def go(i: int, prompt: list[int], n: int) -> None:
        results[i] = one_request(url, model, prompt, n)

    threads, t0 = [], time.perf_counter()
    for i, (at, prompt, n) in enumerate(requests):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        threads.append(threading.Thread(target=go, args=(i, prompt, n), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "pyengine", "serve", "--port", "0", "--backend", args.backend]
    for flag, value in (("--weights", args.weights), ("--config", args.config), ("--max-seqs", args.max_seqs),
                        ("--max-model-len", args.max_model_len)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"bench_serve: the server did not start ({line.strip() or 'no output'})")
    return proc, line.split("listening on ")[1].split()[0]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start `pyengine serve` here on a free port)")
    p.add_argument("--weights", help="model folder for the server this benchmark starts")
    p.add_argument("--config", help="deployment JSON for the server this benchmark starts")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "local", "gloo"])
    p.add_argument("--max-seqs", type=int, help="the started server's --max-seqs")
    p.add_argument("--max-model-len", type=int, help="the started server's --max-model-len")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="append the row (one JSON line, with provenance) here")
    args = p.parse_args(argv)
    if args.url is None and args.weights is None and args.config is None:
        p.error("give --url, or --weights / --config for a server to start")
    if not (args.num_prompts >= 1 and args.request_rate > 0 and 0 <= args.range_ratio < 1
            and args.input_len >= 1 and args.output_len >= 1):
        p.error("--num-prompts, --request-rate, --input-len, --output-len must be positive; --range-ratio in [0, 1)")
    return args


def main(argv=None) -> int:
    from pyengine.core.provenance import command_line, git_commit, now

    args = parse_args(argv)
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        card = get_json(f"{url}/v1/models")["data"][0]
        device = get_json(f"{url}/health").get("device", "")
        requests = workload(args.num_prompts, args.request_rate, args.input_len, args.output_len,
                            args.range_ratio, card["vocab_size"], args.seed)
        results, duration = run_load(url, card["id"], requests)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
    row = {**summarize(results, duration), "request_rate": args.request_rate, "num_prompts": args.num_prompts,
           "server_device": device, "note": CPU_NOTE if device.startswith("cpu") else ""}
    print_row(row, [r.error for r in results if not r.ok])
    if args.json:
        record = {"row": row, "provenance": {"machine": f"{platform.node()} ({platform.machine()}, "
                                                        f"{os.cpu_count()} CPUs)", "date": now(),
                                             "commit": git_commit(), "command": command_line()}}
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if row["failed"] == 0 else 1


def print_row(row: dict, errors: list[str]) -> None:
    lines = [("Successful requests", row["completed"]), ("Failed requests", row["failed"]),
             ("Benchmark duration (s)", f"{row['duration']:.2f}"),
             ("Total input tokens", row["total_input_tokens"]), ("Total generated tokens", row["total_output_tokens"]),
             ("Request throughput (req/s)", f"{row['request_throughput']:.2f}"),
             ("Output token throughput (tok/s)", f"{row['output_throughput']:.2f}"),
             ("Total Token throughput (tok/s)", f"{row['total_token_throughput']:.2f}")]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL")):
        lines += [(f"Mean {label} (ms)", f"{row[f'mean_{name}_ms']:.2f}"),
                  (f"Median {label} (ms)", f"{row[f'median_{name}_ms']:.2f}"),
                  (f"P99 {label} (ms)", f"{row[f'p99_{name}_ms']:.2f}")]
    print(" Serving Benchmark Result ".center(50, "="))
    for label, value in lines:
        print(f"{label:<40}{value:>10}")
    if row["note"]:
        print(row["note"])
    for e in errors[:5]:
        print(f"failed: {e}")
    print("=" * 50)


if __name__ == "__main__":
    sys.exit(main())
