"""The service benchmark (bench.py --serve): serve.py measured from outside against its in-process ceiling.

For batching on (--max-batch) and off, a serve.py process on a free port of 127.0.0.1 and, for each number of
--clients, that many clients posting photos one after another (multipart, as the page does): photos/s, p50 and p99
latency, the server's mean batch and memory. Its ceiling: the same model in the benchmark's process captioning the
same photo bytes in batches of --max-batch (with --serve-workers N, N such processes at once).
"""

import asyncio
import contextlib
import io
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from captioner.files import DataError
from captioner.images import list_images
from utils import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT / "data" / "flickr8k_sample" / "Images"


def serve_bench(args):
    """serve.py measured from outside: for batching on (--max-batch) and off (1), a server process on a free
    port of 127.0.0.1, and for each number of --clients, that many clients each posting photos one after
    another (multipart, as the page does), after one untimed round. Its ceiling: the same model in this
    process captioning the same photo bytes (decoded as the server decodes them) in batches of --max-batch."""
    checkpoint = find_checkpoint(args.checkpoint)
    folder = Path(args.data) / "Images" if args.data else SAMPLE_IMAGES
    photos = [p.read_bytes() for p in list_images(folder)[:64]]
    if not photos:
        raise DataError(f"{folder}: no photos to send")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, rounds = os.getloadavg()[0], 2 if args.smoke else 12
    ceiling, model_only, one_at_a_time = in_process_rate(checkpoint, photos, args.max_batch, rounds)
    if args.serve_workers > 1:
        ceiling = parallel_rate(checkpoint, photos, args.max_batch, rounds, args.serve_workers)
    r = {"checkpoint": str(checkpoint), "photos": len(photos), "threads": torch.get_num_threads(),
         "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "workers": args.serve_workers,
         "model_only_photos_per_s": model_only,
         "one_at_a_time_photos_per_s": one_at_a_time, "load_average_before": load_before, "runs": []}
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        with serve_process(checkpoint, max_batch, args.max_wait_ms, r["threads"], args.serve_workers) as (url, pid):
            r[f"server_idle_rss_mib_batching_{batching}"] = memory_mib(pid)[0]
            for clients in args.clients:
                n = args.requests or (2 * clients if args.smoke else max(32, 4 * clients))
                run = asyncio.run(serve_load(url, photos, clients, n))
                run.update(batching=batching, clients=clients)
                if args.serve_workers > 1:  # /health speaks for whichever worker answered it
                    run["mean_batch"] = None
                r["runs"].append(run)
            r[f"server_rss_mib_batching_{batching}"], r[f"server_private_mib_batching_{batching}"] = memory_mib(pid)
    # measured again after the server's runs: on a machine shared with other work, the two tell how steady it
    # was; the ratios take the higher, the harder ceiling to reach
    again = parallel_rate(checkpoint, photos, args.max_batch, rounds, args.serve_workers)
    r.update(ceiling_before_photos_per_s=ceiling, ceiling_after_photos_per_s=again,
             ceiling_photos_per_s=max(ceiling, again), load_average_after=os.getloadavg()[0])
    for run in r["runs"]:
        run["of_ceiling"] = run["photos_per_s"] / r["ceiling_photos_per_s"]
    return r


def parallel_rate(checkpoint, photos, batch, rounds, processes):
    """The batched in-process rate (photos/s, decoding included) of `processes` processes at once, each with
    its own model and this process's thread count, as --workers runs them: the sum of their rates, timed
    together (each starts once all have loaded their model). One process: this one."""
    if processes == 1:
        return in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=False)[0]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    jobs = [context.Process(target=_rate_in_child, args=(str(checkpoint), photos, batch, rounds,
                                                          torch.get_num_threads(), barrier, results))
            for _ in range(processes)]
    for job in jobs:
        job.start()
    rates = [results.get(timeout=1800) for _ in jobs]
    for job in jobs:
        job.join()
    return sum(rates)


def _rate_in_child(checkpoint, photos, batch, rounds, threads, barrier, results):
    torch.set_num_threads(threads)
    results.put(in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=False, loaded=barrier.wait)[0])


def in_process_rate(checkpoint, photos, batch, rounds, one_at_a_time=True, loaded=lambda: None):
    """Photos/s of Captioner.describe in this process over `rounds` batches of `batch` photos, decoding each
    from its bytes as serve.py does; the same on photos decoded beforehand (the model alone); and one photo
    at a time, decoding included. One untimed batch first. loaded(): called once the model is."""
    from captioner.describe import Captioner

    captioner = Captioner(checkpoint)
    loaded()
    decoded = [captioner.load(io.BytesIO(b)) for b in photos]

    def caption(chunk):
        captioner.describe_batch([captioner.load(io.BytesIO(b)) if isinstance(b, bytes) else b for b in chunk])

    def rate(size, photos=photos):
        chunks = [[photos[(k * size + i) % len(photos)] for i in range(size)] for k in range(rounds * batch // size)]
        caption(chunks[0])
        start = time.perf_counter()
        for chunk in chunks:
            caption(chunk)
        return sum(map(len, chunks)) / (time.perf_counter() - start)

    return rate(batch), rate(batch, decoded), rate(1) if one_at_a_time else None


@contextlib.contextmanager
def serve_process(checkpoint, max_batch, max_wait_ms, threads, workers=1):
    """serve.py on a free port of 127.0.0.1, once /health says ready (every worker's): yields (its URL, its
    pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as log:  # the server's stderr, shown if it fails
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint",
                                 str(checkpoint), "--port", str(port), "--max-batch", str(max_batch),
                                 "--max-wait-ms", str(max_wait_ms), "--threads", str(threads), "--workers",
                                 str(workers), "--log-level", "warning"], stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, log)
            if workers > 1:
                deadline = time.monotonic() + 300
                while len(worker_pids(proc.pid)) < workers:  # uvicorn starts the others once the first is ready
                    if time.monotonic() > deadline:
                        raise DataError(f"serve.py did not start {workers} workers within 5 minutes")
                    time.sleep(0.25)
                for _ in range(10 * workers):  # each on a new connection, which any worker may take
                    wait_ready(url, proc, log)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def wait_ready(url, proc, log, minutes=5):
    import httpx

    with httpx.Client(timeout=5, trust_env=False) as client:
        for _ in range(minutes * 240):
            if proc.poll() is not None:
                log.seek(0)
                said = log.read().decode(errors="replace").strip().splitlines() or ["(nothing on stderr)"]
                raise DataError(f"serve.py exited with status {proc.returncode} before it was ready: {said[-1]}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.25)
    raise DataError(f"serve.py was not ready within {minutes} minutes")


async def serve_load(url, photos, clients, n):
    """`clients` concurrent clients posting n photos in all, after an untimed round of one each: photos/s,
    p50 and p99 latency (ms), and the server's mean batch over the timed requests (from /health)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def post(i, latencies):
            start = time.perf_counter()
            r = await client.post("/caption", files={"image": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

        async def run(count, latencies):
            todo = iter(range(count))
            await asyncio.gather(*(worker(todo, latencies) for _ in range(clients)))

        async def worker(todo, latencies):
            for i in todo:
                await post(i, latencies)

        await run(clients, [])
        before = (await client.get("/health")).json()
        latencies, start = [], time.perf_counter()
        await run(n, latencies)
        seconds = time.perf_counter() - start
        after = (await client.get("/health")).json()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": n, "photos_per_s": n / seconds, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": cuts[98] * 1000, "mean_batch": (after["photos"] - before["photos"]) /
            max(after["batches"] - before["batches"], 1)}


def worker_pids(pid):
    """--workers: the worker processes under uvicorn's supervisor `pid` (none when it serves by itself)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]


def memory_mib(pid):
    """(RSS, the private part of it: what the process alone holds, not the libraries it shares), MiB, of the
    server's process, or of its worker processes together when it has some."""
    rss = private = 0
    for p in worker_pids(pid) or [pid]:
        text = Path(f"/proc/{p}/smaps_rollup").read_text()
        kib = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
        rss, private = rss + kib["Rss"] / 1024, private + (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024
    return rss, private


def report_serve(r):
    workers = f"{r['workers']} worker processes of " if r["workers"] > 1 else ""
    print(f"serve.py benchmark: {r['checkpoint']}, beam 3, {workers}{r['threads']} PyTorch threads, "
          f"{r['photos']} photos sent in turn (multipart); load average {r['load_average_before']:.1f} before, "
          f"{r['load_average_after']:.1f} after")
    together = f" ({r['workers']} processes at once, their sum)" if r["workers"] > 1 else ""
    print(f"ceiling, in process: {r['ceiling_photos_per_s']:.2f} photos/s in batches of {r['max_batch']}{together}, "
          f"decoding included (measured before the server runs {r['ceiling_before_photos_per_s']:.2f}, after "
          f"{r['ceiling_after_photos_per_s']:.2f}); one process: {r['model_only_photos_per_s']:.2f} on photos "
          f"decoded beforehand, {r['one_at_a_time_photos_per_s']:.2f} photos/s one at a time")
    print(f"{'batching':<10}{'clients':>8}{'requests':>10}{'photos/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'batch':>7}{'of ceiling':>12}")
    for run in r["runs"]:
        label = f"on ({r['max_batch']}, {r['max_wait_ms']:g} ms)" if run["batching"] == "on" else "off"
        batch = "-" if run["mean_batch"] is None else f"{run['mean_batch']:.1f}"
        print(f"{label:<10}{run['clients']:>8}{run['requests']:>10}{run['photos_per_s']:>10.2f}"
              f"{run['p50_ms']:>9.0f}{run['p99_ms']:>9.0f}{batch:>7}{run['of_ceiling']:>12.0%}")
    for batching in ("on", "off"):
        print(f"server process, batching {batching}: RSS {r[f'server_idle_rss_mib_batching_{batching}']:.0f} MiB "
              f"once ready, {r[f'server_rss_mib_batching_{batching}']:.0f} MiB after the runs, of which "
              f"{r[f'server_private_mib_batching_{batching}']:.0f} MiB private (not shared with other processes)")
