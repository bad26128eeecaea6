"""The demo's sample data: deterministic JSON orders, and the four topics they travel."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

__all__ = ["PARTITIONS", "PLAINTEXT_MARKER", "Record", "Topics", "sample_records"]

PARTITIONS = 3
#: Every sample order value contains this; no encrypted value may.
PLAINTEXT_MARKER = b'"order_id":"ord-'

Headers = tuple[tuple[str, bytes], ...]
Record = tuple[bytes | None, bytes | None, Headers]  # key, value, headers


@dataclass(frozen=True)
class Topics:
    """The demo's four topics (and, in v2, the keys topic beside the encrypted one)."""

    source: str = "demo.orders"
    encrypted: str = "demo.orders.enc"
    decrypted: str = "demo.orders.dec"
    dlq: str = "demo.orders.dlq"

    @property
    def all(self) -> tuple[str, str, str, str]:
        return (self.source, self.encrypted, self.decrypted, self.dlq)

    @property
    def keys(self) -> str:
        return f"{self.encrypted}.keys"


def sample_records(count: int, *, seed: int = 2024) -> Iterator[Record]:
    """Deterministic JSON orders keyed by customer; 1% null keys, every 1,000th a tombstone.

    Nine in ten records carry headers (content type, a trace id), so the check that headers
    pass through unchanged has something to compare.
    """
    rng = random.Random(seed)  # noqa: S311 - sample data, not cryptography
    for n in range(count):
        customer = f"cust-{rng.randrange(5_000):05d}"
        headers: Headers = (
            ()
            if n % 10 == 7
            else (
                ("content-type", b"application/json"),
                ("trace-id", rng.randbytes(8).hex().encode()),
            )
        )
        if n % 1_000 == 999:
            yield customer.encode(), None, headers
            continue
        lines = [
            (f"SKU-{rng.randrange(10_000):05d}", rng.randint(1, 5), rng.randrange(199, 19_999))
            for _ in range(rng.randint(1, 4))
        ]
        order = {
            "order_id": f"ord-{n:07d}",
            "customer": customer,
            "items": [{"sku": sku, "qty": qty, "price_cents": price} for sku, qty, price in lines],
            "total_cents": sum(qty * price for _, qty, price in lines),
            "currency": "EUR",
            "status": "placed",
        }
        yield (None if n % 100 == 42 else customer.encode()), orjson.dumps(order), headers
