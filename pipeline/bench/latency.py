"""``python -m pipeline.bench latency``: streaming images/s when every storage request is slow.

Shards of 256 px JPEGs lie in an S3 bucket (moto's server on 127.0.0.1, a dev dependency);
the reader reaches it through a TCP proxy (a process of its own) that holds each request for
``--latency-ms`` before passing it on, as a distant object store would. The measured loop is
the reader's: the shards read in turn, four times over (``pipeline.data.shardio.iter_shards``),
and every image decoded (``decode_rgb``), with ``prefetch_shards`` 0 (each shard streamed when
its turn comes) and ``--prefetch`` (the next shards fetched whole while one is decoded). Rounds
alternate the settings; the figure is the median images/s after the first shard.
Goal: with prefetch, within 10 % of the rate without added latency (prefetch on in both).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import s3fs

from pipeline.data.decode import decode_rgb, image_bytes
from pipeline.data.info import read_info
from pipeline.data.shardio import SkipCounter, iter_shards
from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards

GOAL = 0.9  # with prefetch, at least 90 % of the no-latency rate
PASSES = 4  # reads of every shard per measurement: seconds of streaming from a small bucket
CREDENTIALS = {"key": "bench", "secret": "bench"}


def _pump(
    source: socket.socket,
    sink: socket.socket,
    answered: threading.Event,
    request: bool,
    delay_s: float,
) -> None:
    """Copy one direction of a connection; a request is held ``delay_s`` before it is passed."""
    try:
        while data := source.recv(1 << 16):
            if request and answered.is_set():
                answered.clear()
                time.sleep(delay_s)
            elif not request:
                answered.set()
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _serve(listener: socket.socket, target: tuple[str, int], delay_s: float) -> None:
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(target)
        answered = threading.Event()
        answered.set()  # the first bytes on a connection are a request
        for ends in ((server, client, False), (client, server, True)):
            threading.Thread(target=_pump, args=(*ends[:2], answered, ends[2], delay_s)).start()


class DelayProxy:
    """Forwards 127.0.0.1:port to ``target``, holding each request for ``delay_s``: the first
    bytes a client sends on a connection, or after the server last answered. moto's server
    closes every connection after its response, so each request comes on a connection of its
    own: the delay stands for one round trip per request. The proxy runs in a process of its
    own, so that its copying does not take the measured reader's interpreter lock."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        context = multiprocessing.get_context("fork")
        self._process = context.Process(
            target=_serve, args=(listener, target, delay_s), daemon=True
        )
        self._process.start()
        listener.close()

    @property
    def endpoint_url(self) -> str:
        """The URL clients use instead of the target's."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop the proxy."""
        self._process.terminate()
        self._process.join()


def _moto(port: int, nice: int = 0) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:``port``; ``nice`` lowers its CPU priority."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        ["nice", "-n", str(nice), *command] if nice else command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("moto's S3 server did not start (pip install 'moto[server]')")


def _options(endpoint: str) -> dict:
    return {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint}}


def stream_rate(urls: list[str], storage_options: dict, prefetch: int) -> float:
    """Images decoded per second over the shards ``urls``, after the first shard (start-up)."""
    counter, seen, start = SkipCounter(), 0, None
    shards: Iterator = iter_shards(urls, counter, storage_options, prefetch_shards=prefetch)
    for _, samples in shards:
        for sample in samples:
            decode_rgb(image_bytes(sample))
            seen += start is not None
        if start is None:
            start = time.perf_counter()
    return seen / (time.perf_counter() - start)


def measure(
    latency_ms: float, images: int, per_shard: int, rounds: int, prefetch: int = 1
) -> dict[str, float]:
    """Median images/s per setting: with and without ``prefetch`` shards fetched ahead, with
    no added latency and with ``latency_ms`` per request."""
    port = socket.create_server(("127.0.0.1", 0))
    moto_port = port.getsockname()[1]
    port.close()
    moto = _moto(moto_port)
    proxies = {0.0: None, latency_ms: None}
    try:
        direct = _options(f"http://127.0.0.1:{moto_port}")
        s3fs.S3FileSystem(**direct).mkdir("bench")
        write_shards(
            shapes(images, 256, seed=0),
            "s3://bench/shards",
            samples_per_shard=per_shard,
            val_samples=0,
            storage_options=direct,
            progress=False,
        )
        urls = list(read_info("s3://bench/shards", direct).split("train").shard_urls)
        for delay in proxies:
            proxies[delay] = DelayProxy(("127.0.0.1", moto_port), delay / 1000)
        settings = {
            "no_latency_no_prefetch": (0.0, 0),
            "no_latency": (0.0, prefetch),
            "latency_no_prefetch": (latency_ms, 0),
            "latency_prefetch": (latency_ms, prefetch),
        }
        rates: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(rounds):
            for name, (delay, depth) in settings.items():
                options = _options(proxies[delay].endpoint_url)
                rates[name].append(stream_rate(urls * PASSES, options, depth))
    finally:
        for proxy in proxies.values():
            if proxy is not None:
                proxy.close()
        moto.terminate()
        moto.wait()
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str]) -> dict:
    """Run the measurement, print the report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench latency")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--images", type=int, default=2048, help="256 px JPEGs in the bucket")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--prefetch", type=int, default=1, help="shards fetched ahead")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    figures = measure(
        args.latency_ms, args.images, args.samples_per_shard, args.rounds, args.prefetch
    )
    figures["prefetch_vs_no_latency"] = figures["latency_prefetch"] / figures["no_latency"]
    figures["no_prefetch_vs_no_latency"] = figures["latency_no_prefetch"] / figures["no_latency"]
    figures["goal"] = GOAL
    figures["goal_met"] = figures["prefetch_vs_no_latency"] >= GOAL
    print(
        f"{args.images} images of 256 px in shards of {args.samples_per_shard}, moto S3 behind "
        f"a proxy adding {args.latency_ms:g} ms per request, median of {args.rounds} rounds"
    )
    print(f"  no added latency, no prefetch:   {figures['no_latency_no_prefetch']:7.1f} images/s")
    print(f"  no added latency, prefetch {args.prefetch}:    {figures['no_latency']:7.1f} images/s")
    print(
        f"  {args.latency_ms:g} ms, no prefetch:          {figures['latency_no_prefetch']:7.1f} "
        f"images/s ({figures['no_prefetch_vs_no_latency']:.2f}x)"
    )
    print(
        f"  {args.latency_ms:g} ms, prefetch {args.prefetch}:"
        f"          {figures['latency_prefetch']:7.1f} "
        f"images/s ({figures['prefetch_vs_no_latency']:.2f}x)"
    )
    print(f"  goal: >= {GOAL}x the no-latency rate: {'met' if figures['goal_met'] else 'MISSED'}")
    return figures
