"""Small helpers shared by the reliability tests (not a test module)."""
from __future__ import annotations


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
