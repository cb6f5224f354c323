"""Small helpers shared by the tests (not a test module)."""
from __future__ import annotations

import asyncio


async def wait_until_idle(engine, timeout_s: float = 2.0) -> tuple[int, int]:
    """Poll a streaming engine's stats() until nothing runs or waits (or time runs out); return them."""
    for _ in range(int(timeout_s / 0.01)):
        if engine.stats() == (0, 0):
            break
        await asyncio.sleep(0.01)
    return engine.stats()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus metric's samples whose name matches and whose labels contain `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample = head.split("{")[0]
        if sample != name or (labels and labels not in head):
            continue
        total += float(value)
    return total
