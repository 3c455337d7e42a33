"""Reading Prometheus endpoints in tests: every sample by `name{label="value",...}` (labels
sorted), summed over the endpoints read."""

from __future__ import annotations

from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

Series = Counter[str]


def sample_key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def scrape(*urls: str) -> Series:
    """The samples of the endpoints at `urls`, summed (5 s deadline each)."""
    total: Series = Counter()
    for url in urls:
        text = httpx.get(url, timeout=5.0).raise_for_status().text
        for family in text_string_to_metric_families(text):
            total.update({sample_key(s.name, s.labels): s.value for s in family.samples})
    return total
