"""A bounded local load test of `finetune serve` on the text quickstart's run (loopback only).

    .venv/bin/python benchmarks/serve.py [--run runs/text-quickstart] [--requests 300] [--seconds 8]

Trains the run first when it is missing (`finetune run recipes/text-quickstart.toml`, about a minute).
Starts `finetune serve RUN --port 0` on 127.0.0.1, then:

- latency: one client sending one short text at a time (`{"text": "what a lovely day"}`), --requests
  of them after a warm-up: p50 / p99 / mean in ms, measured at the client (HTTP included);
- throughput: 1, 8 and 32 concurrent clients (threads, one keep-alive connection each), each sending
  single-text requests for --seconds: requests/s, against the 1-client (sequential) rate;
- the server's own counters afterwards (batches, largest batch), and texts per forward pass per phase;
- for comparison, one `finetune predict RUN --text ...` in a new process (what an answer costs without a
  server).

`--ab ROUNDS` instead compares how the server loads the run, alternating (A B A B ...) in one session: the
adapter merged in the precision predict chooses (the default, as `finetune predict` loads a run) against
the adapter kept apart in fp32 (`--no-merge --precision fp32`: how serve predicted before it loaded runs
as predict does): latency of one text at 1 client and requests/s at 32 clients, each round a fresh server.

`--ab-in-process CALLS` makes the same comparison without HTTP or a server, in this process: the run loaded
once, a copy merged, ``task.predict`` on one short text (CALLS times) and on 32 texts (CALLS / 5 times), the
two models alternating call by call (what a busy machine's load cannot tilt), and the largest probability
difference between them.

Goals (issue 26): p50 under 30 ms for one text; at 32 clients at least 5x the sequential throughput.
Every request's answer is checked (status 200, one prediction). The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = "what a lovely day"
TEXTS = ["what a lovely day", "this is awful", "meh", "i love it :)", "worst service ever", "not bad at all",
         "so boring", "fantastic!"]


def finetune_exe() -> str:
    return shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"


def ensure_run(run: Path) -> None:
    if (run / "adapter").exists() and (run / "metrics.json").exists():
        return
    print(f"{run} missing: training it (finetune run recipes/text-quickstart.toml)...", file=sys.stderr)
    subprocess.run([finetune_exe(), "run", str(REPO / "recipes" / "text-quickstart.toml"), "-q"], check=True,
                   cwd=REPO)


def start_server(run: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([finetune_exe(), "serve", str(run), "--port", "0", *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, int(found.group(1))
    proc.kill()
    raise SystemExit("finetune serve did not start")


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def predict(self, text: str) -> float:
        start = time.perf_counter()
        self.conn.request("POST", "/predict", body=json.dumps({"text": text}),
                          headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        body = response.read()
        took = time.perf_counter() - start
        if response.status != 200 or len(json.loads(body)["predictions"]) != 1:
            raise SystemExit(f"bad answer {response.status}: {body[:300]!r}")
        return took

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        return json.loads(self.conn.getresponse().read())


def throughput(port: int, clients: int, seconds: float) -> tuple[float, int]:
    counts = [0] * clients
    window = {"stop": 0.0}
    barrier, go = threading.Barrier(clients + 1), threading.Event()

    def work(i: int) -> None:
        client = Client(port)
        client.predict(TEXTS[i % len(TEXTS)])  # connect and warm up outside the timed window
        barrier.wait()
        go.wait()
        while time.perf_counter() < window["stop"]:
            client.predict(TEXTS[(i + counts[i]) % len(TEXTS)])
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    window["stop"] = start + seconds
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return sum(counts) / wall, sum(counts)


def latency(port: int, requests: int) -> list[float]:
    client = Client(port)
    for _ in range(30):
        client.predict(TEXT)
    return sorted(client.predict(TEXT) * 1000 for _ in range(requests))


def percentiles(lat: list[float]) -> tuple[float, float]:
    return statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def compare_loading(args: argparse.Namespace) -> None:
    """--ab: the adapter merged (default) vs kept apart in fp32, alternating, a fresh server each round."""
    configs = {"merged, predict's precision (default)": [],
               "kept apart, fp32 (`--no-merge --precision fp32`: before)": ["--no-merge", "--precision", "fp32"]}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
    loads = [os.getloadavg()]
    for _ in range(args.ab):
        for name, extra in configs.items():
            proc, port = start_server(args.run, [*extra, *args.serve_arg])
            try:
                p50, p99 = percentiles(latency(port, args.requests))
                rate = throughput(port, 32, args.seconds)[0]
            finally:
                stop(proc)
            results[name].append((p50, p99, rate))
    loads.append(os.getloadavg())
    shown = " -> ".join(", ".join(f"{x:.2f}" for x in load) for load in loads)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load averages (1, 5, 15 min) {shown}; "
          f"run {args.run}; {args.ab} rounds, alternating\n")
    print("| server | p50 latency, 1 client (each round) | p99 | requests/s, 32 clients |\n|---|---|---|---|")
    for name, rows in results.items():
        p50s = ", ".join(f"{r[0]:.1f}" for r in rows)
        p99s = ", ".join(f"{r[1]:.1f}" for r in rows)
        rates = ", ".join(f"{r[2]:.0f}" for r in rows)
        print(f"| {name} | {p50s} ms (median {statistics.median(r[0] for r in rows):.1f}) | {p99s} ms | {rates} "
              f"(median {statistics.median(r[2] for r in rows):.0f}) |")


def loads() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def compare_in_process(run: Path, calls: int) -> None:
    """--ab-in-process: task.predict with the adapter merged vs kept apart, alternating call by call."""
    import copy

    from finetune.engine import threads

    threads.apply(threads.choose())
    import torch

    from finetune.run.inference import load_run, merge_for_inference
    from finetune.run.predictions import predict_records

    task, model, processor, _ = load_run(run)
    merged = copy.deepcopy(model)
    said = merge_for_inference(merged)
    load = loads()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} threads, load averages {load}; {said}\n")
    print("| input | merged (median, p90) | kept apart (median, p90) | max probability difference |\n|---|---|---|---|")
    for name, records, n in (("one short text", [{"text": TEXT}], calls),
                             ("32 texts", [{"text": t} for t in TEXTS * 4], max(2, calls // 5))):
        times: dict[str, list[float]] = {"merged": [], "apart": []}
        with torch.inference_mode():
            for m in (merged, model):  # warm-up
                predict_records(task, m, processor, records, 32)
            for i in range(n):
                pairs = [("merged", merged), ("apart", model)]
                for label, m in pairs if i % 2 == 0 else pairs[::-1]:
                    start = time.perf_counter()
                    predict_records(task, m, processor, records, 32)
                    times[label].append((time.perf_counter() - start) * 1000)
            a, b = (predict_records(task, m, processor, records, 32) for m in (merged, model))
        diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k.startswith("prob_"))
        cells = [f"{statistics.median(t):.1f} ms, {sorted(t)[int(0.9 * len(t))]:.1f} ms"
                 for t in (times["merged"], times["apart"])]
        print(f"| {name} ({n} calls each) | {cells[0]} | {cells[1]} | {diff:.1e} |")
    print(f"\nload averages at the end: {loads()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "text-quickstart")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests for the latency figures")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each throughput measurement")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `finetune serve` option (repeat)")
    parser.add_argument("--no-predict", action="store_true",
                        help="skip the one `finetune predict --text` call timed for comparison")
    parser.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                        help="instead: the adapter merged (default) vs kept apart in fp32, alternating ROUNDS times")
    parser.add_argument("--ab-in-process", type=int, default=0, metavar="CALLS",
                        help="instead: task.predict merged vs kept apart in this process, alternating")
    args = parser.parse_args()
    ensure_run(args.run)
    if args.ab_in_process:
        compare_in_process(args.run, args.ab_in_process)
        return
    if args.ab:
        compare_loading(args)
        return
    load = os.getloadavg()[0]
    predict_s = None
    if not args.no_predict:
        start = time.perf_counter()
        subprocess.run([finetune_exe(), "predict", str(args.run), "--text", TEXT], check=True, cwd=REPO,
                       capture_output=True)
        predict_s = time.perf_counter() - start
    proc, port = start_server(args.run, args.serve_arg)
    try:
        client = Client(port)
        for _ in range(30):
            client.predict(TEXT)
        lat = sorted(client.predict(TEXT) * 1000 for _ in range(args.requests))
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rates, sizes = {}, {}
        for n in (1, 8, 32):
            before = client.get("/health")
            rates[n] = throughput(port, n, args.seconds)
            after = client.get("/health")
            sizes[n] = (after["records"] - before["records"]) / max(1, after["batches"] - before["batches"])
        stats = client.get("/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    busy = f"; busy machine: load average {load:.1f} at the start" if load > 1.5 else ""
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs{busy}; run {args.run}; "
          f"serve options: {' '.join(args.serve_arg) or 'defaults'}\n")
    print("| measure | value | goal |\n|---|---|---|")
    print(f"| latency, one short text, 1 client (n={len(lat)}) | p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"mean {statistics.fmean(lat):.1f} ms | p50 < 30 ms |")
    if predict_s is not None:
        print(f"| for comparison: one `finetune predict --text` (a new process) | {predict_s:.1f} s | |")
    base = rates[1][0]
    for n, (rate, done) in rates.items():
        goal = ">= 5x sequential" if n == 32 else ""
        print(f"| throughput, {n} client(s) ({done} requests in {args.seconds:g} s) | {rate:.0f} requests/s "
              f"({rate / base:.1f}x sequential; {sizes[n]:.1f} texts per forward pass) | {goal} |")
    print(f"\nserver counters: {stats['requests']} requests, {stats['records']} records in {stats['batches']} "
          f"batches (largest {stats['largest_batch']})")


if __name__ == "__main__":
    main()
