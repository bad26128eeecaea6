"""Prometheus metrics: scraped from running workers, and the pieces they are built from."""

from __future__ import annotations

import asyncio
import math
import random
import signal
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import ConfigError
from pipeline.histogram import Histogram
from tests import kit
from tests.kit import Rec, Workers
from workers.dev import DevEnv
from workers.dev.ports import free_port
from workers.metrics import METRIC_FAMILIES, MetricsServer, Snapshot


def _get(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _scrape(port: int) -> dict[str, Any]:
    """{family name: {labels tuple: value}} for every sample, as Prometheus would read it."""
    status, text = await asyncio.to_thread(_get, port)
    assert status == 200
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


async def _scrape_until(port: int, ready: Any, within: float = 60) -> dict[str, Any]:
    """Scrape until `ready(samples)` holds (the worker serves metrics while it starts)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            samples = await _scrape(port)
            if ready(samples):
                return samples
        except (OSError, AssertionError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"metrics on port {port} never got ready")
        await asyncio.sleep(0.2)


def _value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return float(samples.get(name, {}).get(tuple(sorted(labels.items())), math.nan))


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_scraping_running_workers(dev_env: DevEnv, workers: Workers) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (kit.name(f"metrics-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    count = 2_000
    await kit.produce(bootstrap, plain, kit.keyed(count, 300))
    encrypt_port, decrypt_port = free_port(), free_port()
    encrypt = await workers.encrypt(
        plain, enc, kit.name("g"), name="enc", ENVPIPE_METRICS_PORT=str(encrypt_port)
    )
    sealed = await _scrape_until(
        encrypt_port,
        lambda s: _value(s, "envpipe_records_total", direction="encrypt", outcome="ok") == count,
    )
    # Every contracted family is there, with the type the contract gives it.
    _, text = await asyncio.to_thread(_get, encrypt_port)
    exported = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name, kind in METRIC_FAMILIES.items():
        assert exported.get(name.removesuffix("_total")) == kind, name
    assert _value(sealed, "envpipe_records_total", direction="encrypt", outcome="dlq") == 0
    assert _value(sealed, "envpipe_record_seconds_count", direction="encrypt") == count
    assert _value(sealed, "envpipe_end_to_end_seconds_count", direction="encrypt") == count
    assert _value(
        sealed,
        "envpipe_kms_requests_total",
        provider="aws",
        operation="generate_data_key",
        outcome="ok",
    )
    assert (
        _value(sealed, "envpipe_kms_requests_total", provider="aws", operation="sign", outcome="ok")
        == 1
    )
    assert (
        _value(sealed, "envpipe_kms_request_seconds_count", provider="aws", operation="sign") == 1
    )
    hits = _value(sealed, "envpipe_dek_cache_events_total", cache="encrypt", event="hit")
    misses = _value(sealed, "envpipe_dek_cache_events_total", cache="encrypt", event="miss")
    assert (hits, misses) == (count - 1, 1)  # the first record waited for the first DEK
    assert _value(sealed, "envpipe_inflight_bytes") == 0
    assert _value(sealed, "envpipe_paused_partitions") == 0
    lags = [_value(sealed, "envpipe_consumer_lag", topic=plain, partition=str(p)) for p in range(3)]
    assert lags == [0, 0, 0]
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for labels, value in sealed["envpipe_record_seconds_bucket"].items()
    )
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)
    assert buckets[0][0] <= 1e-6  # fine enough to see microseconds
    assert buckets[-1] == (math.inf, count)

    # The decrypt side: good records, and bad ones to the DLQ, counted by outcome.
    await kit.produce(bootstrap, enc, [Rec(b"bad-1", b"not an envelope"), Rec(b"bad-2", b"\0")])
    decrypt = await workers.decrypt(
        enc, dec, dlq, kit.name("g"), name="dec", ENVPIPE_METRICS_PORT=str(decrypt_port)
    )
    opened = await _scrape_until(
        decrypt_port,
        lambda s: _value(s, "envpipe_records_total", direction="decrypt", outcome="ok") == count,
    )
    assert _value(opened, "envpipe_records_total", direction="decrypt", outcome="dlq") == 2
    assert (
        _value(
            opened, "envpipe_kms_requests_total", provider="aws", operation="unwrap", outcome="ok"
        )
        == 1
    )
    assert _value(opened, "envpipe_dek_cache_events_total", cache="decrypt", event="miss") == 1
    assert (await asyncio.to_thread(_get, decrypt_port, "/nope"))[0] == 404

    for proc in (encrypt, decrypt):
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.tail()


async def test_a_taken_port_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - where the server would listen
        taken.listen()
        server = MetricsServer(lambda: Snapshot(direction="encrypt"))
        with pytest.raises(ConfigError) as caught:
            await server.start(taken.getsockname()[1])
    assert caught.value.setting == "ENVPIPE_METRICS_PORT"


def test_prometheus_buckets_from_the_log_histogram_are_within_its_accuracy() -> None:
    rng = random.Random(5)
    values = [rng.lognormvariate(-9, 2) for _ in range(20_000)]
    histogram = Histogram(min_value=1e-7, max_value=3600)
    histogram.add_many(values)
    histogram.add_repeated(2e-6, 500)
    values += [2e-6] * 500
    bounds = [1e-6, 5e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1]
    for bound, counted in zip(bounds, histogram.cumulative(bounds), strict=True):
        low = sum(v <= bound / 1.02 for v in values)
        high = sum(v <= bound * 1.02 for v in values)
        assert low <= counted <= high, bound
    assert histogram.count == len(values)
    assert histogram.total == pytest.approx(sum(values))
