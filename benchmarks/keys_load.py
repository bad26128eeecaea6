"""How long a restarted v2 reader takes to load its keys topic, and what each header costs.

    python -m benchmarks.keys_load [--headers 100000] [--runs 3] [--out keys-load.json]

A decrypt worker (or any `KeysTopicReader`) reads the whole keys topic before it opens its
first record, so this load is on the restart path. The program starts the embedded broker
and moto, seals one record with a real v2 Encryptor to get a real header (key ARNs, the
stream's encryption context, a DER signature), and writes `--headers` headers of that shape
to a compacted keys topic: each has its own random dek_id, a random wrapped_dek of
`--wrapped-dek-bytes` (167 by default: the AES_256 CiphertextBlob in the AWS CLI's
generate-data-key example; moto's are 96, so 0 keeps the service's own size), and is
signed by a local P-256 key, so sizes and encodings are those of real AWS headers.

Each run is a fresh process (a restarted reader) that times `KeysTopicReader.open`
(connect, fetch every header, index it) and reads its own RSS before and after. Memory per
DEK is reported two ways: the RSS delta divided by the header count, and the slope between
a load of the full topic and one of a small topic (which cancels the client's fixed cost).
It prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from benchmarks import load as producing
from benchmarks.measure import machine_info, median
from benchmarks.memory_sampling import rss_mib
from benchmarks.services import Child, child_environ, dev_services
from pipeline import envelope_v2
from pipeline.config import load_settings
from pipeline.encryptor import Encryptor
from pipeline.envelope import Header, encode_header, signed_bytes
from pipeline.keys_topic import InMemoryHeaders, KeysTopicReader
from pipeline.kms import open_kms
from workers import topics
from workers.kafka_access import KafkaAccess
from workers.runtime import configure_logging
from workers.runtime import run as run_async

__all__ = ["main", "realistic_headers"]

#: An AWS KMS CiphertextBlob of a 256-bit data key (the AWS CLI's generate-data-key example).
AWS_WRAPPED_DEK_BYTES = 167
#: The small topic whose load is subtracted to get the per-header slope.
SMALL_HEADERS = 1_000
_CHILD_SECONDS = 600.0


async def _template(environ: dict[str, str]) -> Header:
    """One real v2 header, from an Encryptor against the dev service (moto)."""
    settings = replace(load_settings(environ=environ), format="v2")
    kms = await open_kms(settings, environ)
    sink = InMemoryHeaders()
    try:
        encryptor = await Encryptor.from_settings(kms, settings, stream="orders", header_sink=sink)
        sealed = await encryptor.seal(b"a realistic order", b"order-1")
        await encryptor.close()
    finally:
        await kms.close()
    dek_id = envelope_v2.decode_record(sealed)[0]
    return envelope_v2.decode_keys_header(sink.get(dek_id) or b"", dek_id)


def realistic_headers(
    template: Header, count: int, wrapped_dek_bytes: int = 0
) -> Iterator[tuple[bytes, bytes]]:
    """`count` (dek_id, header bytes) shaped like `template`, each signed by a local key;
    `wrapped_dek_bytes` (0: the template's) sets the size of the wrapped DEK."""
    signer = ec.generate_private_key(ec.SECP256R1())
    prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    blob = wrapped_dek_bytes or len(template.wrapped_dek)
    for _ in range(count):
        header = replace(
            template,
            dek_id=secrets.token_bytes(16),
            wrapped_dek=secrets.token_bytes(blob),
            signature=b"",
        )
        digest = hashlib.sha256(signed_bytes(header)).digest()
        yield (
            header.dek_id,
            encode_header(replace(header, signature=signer.sign(digest, prehashed))),
        )


async def _fill(bootstrap: str, topic: str, pairs: Sequence[tuple[bytes, bytes]]) -> float:
    """Create the compacted keys topic and write every header; seconds to acknowledgement."""
    await topics.ensure_keys_topic(KafkaAccess.of(bootstrap), topic, like=topic)
    producer = await producing.open_producer(bootstrap)
    try:
        return await producing.produce(producer, topic, pairs, len(pairs), partitions=1)
    finally:
        await producer.stop()


async def _load(bootstrap: str, topic: str, expected: int) -> dict[str, Any]:
    """In a fresh process: time `KeysTopicReader.open` and the RSS it adds."""
    gc.collect()
    before = rss_mib(os.getpid()) or 0.0
    started = time.perf_counter()
    reader = await KeysTopicReader.open(topic, bootstrap_servers=bootstrap, follow=False)
    open_seconds = time.perf_counter() - started
    try:
        gc.collect()
        after = rss_mib(os.getpid()) or 0.0
        if len(reader) != expected:
            raise RuntimeError(f"loaded {len(reader)} headers from {topic}, not {expected}")
        return {
            "headers": len(reader),
            "open_seconds": round(open_seconds, 4),
            "load_seconds": round(reader.load_seconds, 4),
            "rss_before_mib": round(before, 2),
            "rss_after_mib": round(after, 2),
            "rss_delta_bytes_per_header": round((after - before) * (1 << 20) / expected, 1),
        }
    finally:
        await reader.close()


def _restarted_reader(env: Any, topic: str, expected: int, folder: Path, label: str) -> Any:
    """Run `_load` in a process of its own; its JSON result."""
    out = folder / f"{label}.json"
    args = ["--load", topic, "--bootstrap", env.bootstrap_servers, "--expect", str(expected)]
    child = Child(
        "benchmarks.keys_load",
        [*args, "--out", str(out)],
        child_environ(env),
        folder / f"{label}.log",
    )
    ended = asyncio.run(child.wait(_CHILD_SECONDS))
    if ended.code != 0 or not out.is_file():
        raise RuntimeError(f"the {label} load failed (exit {ended.code}): {child.tail()}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def measure(headers: int, runs: int, wrapped_dek_bytes: int) -> dict[str, Any]:
    """Start the services, fill the topics, load them `runs` times; the figures."""
    folder = Path(tempfile.mkdtemp(prefix="envpipe-keys-load-"))
    with dev_services(folder / "services") as env:
        template = run_async(_template(env.as_environ()))
        big, small = (
            f"bench-keys-{secrets.token_hex(4)}",
            f"bench-keys-small-{secrets.token_hex(4)}",
        )
        started = time.perf_counter()
        pairs = list(realistic_headers(template, headers, wrapped_dek_bytes))
        generate_seconds = time.perf_counter() - started
        produce_seconds = run_async(_fill(env.bootstrap_servers, big, pairs))
        run_async(_fill(env.bootstrap_servers, small, pairs[:SMALL_HEADERS]))
        header_bytes = statistics.fmean(len(value) for _, value in pairs)
        del pairs
        loads = [_restarted_reader(env, big, headers, folder, f"load-{n}") for n in range(runs)]
        smalls = [
            _restarted_reader(env, small, SMALL_HEADERS, folder, f"small-{n}") for n in range(runs)
        ]
    slope = (
        (
            median([load["rss_after_mib"] for load in loads])
            - median([load["rss_after_mib"] for load in smalls])
        )
        * (1 << 20)
        / (headers - SMALL_HEADERS)
    )
    return {
        "headers": headers,
        "header_bytes_mean": round(header_bytes, 1),
        "wrapped_dek_bytes": wrapped_dek_bytes or len(template.wrapped_dek),
        "template": {
            "service_wrapped_dek_bytes": len(template.wrapped_dek),
            "kms_key_id": template.kms_key_id,
            "encryption_context": dict(template.encryption_context),
        },
        "generate_seconds": round(generate_seconds, 2),
        "produce_seconds": round(produce_seconds, 2),
        "loads": loads,
        "small_loads": smalls,
        "median_open_seconds": round(median([load["open_seconds"] for load in loads]), 3),
        "median_load_seconds": round(median([load["load_seconds"] for load in loads]), 3),
        "headers_per_second": round(headers / median([load["load_seconds"] for load in loads])),
        "median_rss_delta_bytes_per_header": round(
            median([load["rss_delta_bytes_per_header"] for load in loads]), 1
        ),
        "rss_slope_bytes_per_header": round(slope, 1),
        "machine": machine_info(),
        "logs": str(folder),
    }


def _print(result: dict[str, Any]) -> None:
    print(f"keys topic: {result['headers']:,} headers of {result['header_bytes_mean']} B (mean)")
    for load in result["loads"]:
        print(
            f"  restarted reader: open {load['open_seconds']:.2f} s "
            f"(load {load['load_seconds']:.2f} s), "
            f"RSS {load['rss_before_mib']:.1f} -> {load['rss_after_mib']:.1f} MiB"
        )
    print(
        f"median open {result['median_open_seconds']:.2f} s, "
        f"{result['headers_per_second']:,} headers/s loaded"
    )
    print(
        f"memory per DEK: {result['median_rss_delta_bytes_per_header']:.0f} B (RSS delta / "
        f"headers), {result['rss_slope_bytes_per_header']:.0f} B (slope vs "
        f"{SMALL_HEADERS:,} headers)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--headers", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wrapped-dek-bytes", type=int, default=AWS_WRAPPED_DEK_BYTES)
    parser.add_argument("--out", type=Path, default=Path("keys-load.json"))
    parser.add_argument("--load", metavar="TOPIC", help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    if args.load:
        result = run_async(_load(args.bootstrap, args.load, args.expect))
    else:
        if args.headers <= SMALL_HEADERS:
            parser.error(f"--headers must be above {SMALL_HEADERS:,}")
        result = measure(args.headers, args.runs, args.wrapped_dek_bytes)
        _print(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
