"""How long one crafted request body holds up a running server's event loop.

A client polls `GET /livez` every 5 ms while another sends one body (each under the 1 MiB
limit); the figure is the worst /livez latency during that request, against the worst of
the 0.3 s before it. Starts nothing: point it at a server (the README's table used the
`tiny` test models, with AR_IMAGE_MODEL and CONDGEN_CHAT_TEMPLATE=docs/chat_template.jinja).

    python -m benchmarks.loop_stall --url http://127.0.0.1:3000 --repeats 3
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

from benchmarks import cli


def _emoji(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()  # 4 bytes a character, as a client sends them


# name -> (route, body): the shapes that held the loop longest before the limits (README, Limits)
BODIES = {
    "95,000 unknown fields": ("/v1/completions", lambda: {"model": "gpt", "prompt": "a",
                                                           **{f"k{i}": 0 for i in range(95_000)}}),
    "logit_bias of 70,000 tokens": ("/v1/completions", lambda: {"model": "gpt", "prompt": "a", "logit_bias": {
        str(100_000 + i): 1 for i in range(70_000)}}),
    "prompt of 100,000 emoji": ("/v1/completions", lambda: _emoji({"model": "gpt", "prompt": "😀" * 99_990,
                                                                   "max_tokens": 1})),
    "340,000 empty lists, unknown field": ("/v1/completions", lambda: {"model": "gpt", "prompt": "a",
                                                                      "x": [[]] * 340_000}),
    "A1111 comments of 330,000 lists": ("/sdapi/v1/txt2img", lambda: {"prompt": "a", "comments": {
        "c": [[]] * 330_000}}),
    "chat metadata of 80,000 entries": ("/v1/chat/completions", lambda: {
        "model": "gpt", "messages": [{"role": "user", "content": "a"}],
        "metadata": {f"k{i}": [0] for i in range(80_000)}}),
    "A1111 alwayson_scripts of 70,000": ("/sdapi/v1/txt2img", lambda: {"prompt": "a", "alwayson_scripts": {
        f"k{i}": [0] for i in range(70_000)}}),
    "TGI /tokenize of 100,000 emoji": ("/tokenize", lambda: _emoji({"inputs": "😀" * 99_990})),
}


class Poller(threading.Thread):
    """GET /livez every 5 ms on one connection, keeping (start, latency) of each."""

    def __init__(self, host: str, port: int):
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.samples: list[tuple[float, float]] = []
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            t = time.perf_counter()
            self.conn.request("GET", "/livez")
            self.conn.getresponse().read()
            self.samples.append((t, time.perf_counter() - t))
            time.sleep(0.005)


def stall(host: str, port: int, route: str, body: bytes) -> tuple[float, float, int]:
    """(worst /livez latency during the request, worst before it, the request's status)."""
    poller = Poller(host, port)
    poller.start()
    time.sleep(0.3)
    before = max(latency for _, latency in poller.samples)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    start = time.perf_counter()
    conn.request("POST", route, body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    end = time.perf_counter()
    time.sleep(0.15)
    poller.stop = True
    poller.join()
    during = max(latency for t, latency in poller.samples if t + latency >= start and t <= end + 0.05)
    return during, before, response.status


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="a running server")
    ap.add_argument("--repeats", type=cli.at_least(1), default=3, help="requests per body (each figure listed)")
    args = ap.parse_args(argv)
    url = urlsplit(args.url)
    print(f"{'body':<36} {'route':<22} {'KiB':>5} {'status':>6}  worst /livez ms (before)")
    for name, (route, make) in BODIES.items():
        body = make()
        body = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        runs = [stall(url.hostname, url.port or 80, route, body) for _ in range(args.repeats)]
        figures = ", ".join(f"{during * 1e3:.0f} ({before * 1e3:.0f})" for during, before, _ in runs)
        print(f"{name:<36} {route:<22} {len(body) >> 10:>5} {runs[0][2]:>6}  {figures}", flush=True)


if __name__ == "__main__":
    main()
