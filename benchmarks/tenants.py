"""What 10,000 tenants cost one writer: KMS calls and memory, by encrypt-cache size.

`python -m benchmarks.tenants [--records N] [--tenants T] [--quick] [--out DIR]` seals N
records (default 1,000,000) whose `tenant` header cycles through T tenants (default 10,000),
with `ENVPIPE_KMS_KEY_ID=alias/tenant-{header:tenant}`, through the worker's own call
(`Encryptor.seal_many`, batches of 2,000 records of 100 bytes, with headers). It runs **in
process on `InMemoryKms`** (real AES-GCM wraps and ECDSA signatures, no network, no broker),
each case in a child interpreter so that its RSS is its own:

    fits            ENVPIPE_ENCRYPT_CACHE_SIZE = T, tenants round-robin
    default         the default size (1,000, below T), tenants round-robin
    default_random  the default size, each record's tenant drawn at random

Figures per case: seconds, records/s, KMS calls by operation (`CountingKms`), DEKs minted,
calls per record, RSS when the keys exist and nothing is sealed, peak (VmHWM) and at the
end, and cache evictions. A real KMS takes milliseconds per DEK, so a case that mints a DEK
per record would run far slower than here: read its calls, not its records/s. Then the
quota arithmetic turns the DEK rules into KMS requests per second (`quota_table`). Results
are printed and written to DIR/tenants.json (default bench-results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.measure import machine_info, peak_rss_mib
from benchmarks.memory_sampling import rss_mib
from pipeline.config import Settings
from pipeline.encryptor import Encryptor, policy_from_settings
from pipeline.kms import CountingKms, InMemoryKms

BATCH = 2_000
VALUE = b"v" * 100
DEFAULT_CACHE = Settings().encrypt_cache_size
CASES = ("fits", "default", "default_random")


def cache_size(case: str, tenants: int) -> int:
    return tenants if case == "fits" else DEFAULT_CACHE


async def run_case(case: str, records: int, tenants: int) -> dict[str, Any]:
    """Seal `records` records for `tenants` tenants; the figures of one case (in the child)."""
    inner = InMemoryKms()
    for index in range(tenants):
        inner.create_key(f"alias/tenant-{index}")
    signing = inner.create_signing_key()  # canonical: never re-resolved
    kms = CountingKms(inner)
    settings = Settings()
    encryptor = Encryptor(
        kms,
        kms_key_id="alias/tenant-{header:tenant}",
        signing_key_id=signing,
        stream="orders",
        policy=policy_from_settings(settings),
        cache_size=cache_size(case, tenants),
    )
    headers = [(("tenant", str(index).encode()),) for index in range(tenants)]
    rng = random.Random(7)
    start_rss = rss_mib_self()
    started = time.perf_counter()
    for first in range(0, records, BATCH):
        count = min(BATCH, records - first)
        if case == "default_random":
            chosen = [headers[rng.randrange(tenants)] for _ in range(count)]
        else:
            chosen = [headers[(first + i) % tenants] for i in range(count)]
        pairs = [(VALUE, b"k%d" % (first + i)) for i in range(count)]
        sealed = await encryptor.seal_many(pairs, headers=chosen)
        if not all(isinstance(value, bytes) for value in sealed):
            raise RuntimeError("a record could not be sealed")
    seconds = time.perf_counter() - started
    end_rss = rss_mib_self()
    stats = dict(encryptor.cache.stats)
    live = len(encryptor.cache)
    await encryptor.close()
    calls = dict(sorted(kms.calls.items()))
    return {
        "case": case,
        "records": records,
        "tenants": tenants,
        "cache_size": cache_size(case, tenants),
        "pattern": "random" if case == "default_random" else "round-robin",
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds),
        "kms_calls": calls,
        "deks": calls.get("generate_data_key", 0),
        "kms_calls_per_record": round(sum(calls.values()) / records, 4),
        "cache_events": stats,
        "live_entries_at_end": live,
        "rss_start_mib": start_rss,
        "rss_peak_mib": peak_rss_mib(),
        "rss_end_mib": end_rss,
    }


def rss_mib_self() -> float:
    """This process's resident set now, in MiB."""
    return round(rss_mib(os.getpid()) or 0.0, 1)


def quota_table(
    tenants: int, rates: Sequence[int], caches: Sequence[int], calls_per_dek: int = 2
) -> list[dict[str, Any]]:
    """KMS requests/s of one writer at R records/s spread evenly over the tenants.

    With the defaults (DEK age A = 300 s, refresh at 0.8, record limit N = 1,000,000):
    * cache >= tenants: a tenant with traffic throughout mints a DEK every 0.8·A, and one
      with less than one record per A mints one per record, so
      DEKs/s = min(R, T / (0.8·A)) (the record limit matters only above T·N/(0.8·A));
    * cache < tenants, tenants interleaved at random: a record's tenant is cached with
      probability C/T, so DEKs/s = R·(1 - C/T) + min(R·C/T, C / (0.8·A));
      round-robin is worse (an LRU smaller than the cycle misses every record: DEKs/s = R).
    Each DEK is `calls_per_dek` requests: GenerateDataKey and Sign (3 with a signing alias,
    which is resolved per DEK; 2 for a canonical ARN).
    """
    settings = Settings()
    period = settings.dek_refresh_at * settings.dek_max_age_seconds
    rows = []
    for rate in rates:
        for cache in caches:
            if cache >= tenants:
                deks = min(rate, tenants / period)
            else:
                hit = cache / tenants
                deks = rate * (1 - hit) + min(rate * hit, cache / period)
            rows.append(
                {
                    "records_per_s": rate,
                    "tenants": tenants,
                    "cache_size": cache,
                    "deks_per_s": round(deks, 2),
                    "kms_requests_per_s": round(deks * calls_per_dek, 1),
                }
            )
    return rows


def print_results(results: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]]) -> None:
    print(
        f"{'case':<15} {'cache':>6} {'pattern':<11} {'records/s':>10} {'DEKs':>9} "
        f"{'calls/record':>12} {'RSS start':>9} {'peak':>7} {'end':>7} MiB"
    )
    for r in results:
        print(
            f"{r['case']:<15} {r['cache_size']:>6,} {r['pattern']:<11} {r['records_per_s']:>10,} "
            f"{r['deks']:>9,} {r['kms_calls_per_record']:>12.4f} {r['rss_start_mib']:>9.1f} "
            f"{r['rss_peak_mib']:>7.1f} {r['rss_end_mib']:>7.1f}"
        )
    print("\nKMS requests/s of one writer (GenerateDataKey + Sign; quota arithmetic):")
    print(f"{'records/s':>10} {'tenants':>8} {'cache':>7} {'DEKs/s':>9} {'requests/s':>11}")
    for row in table:
        print(
            f"{row['records_per_s']:>10,} {row['tenants']:>8,} {row['cache_size']:>7,} "
            f"{row['deks_per_s']:>9,.2f} {row['kms_requests_per_s']:>11,.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="100,000 records instead")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child's work
    args = parser.parse_args(argv)
    records = 100_000 if args.quick else args.records
    if args.case:
        print(json.dumps(asyncio.run(run_case(args.case, records, args.tenants))))
        return 0
    results = []
    for case in CASES:
        print(f"[tenants] {case}: {records:,} records, {args.tenants:,} tenants", file=sys.stderr)
        child = subprocess.run(
            [
                *(sys.executable, "-m", "benchmarks.tenants", "--case", case),
                *("--records", str(records), "--tenants", str(args.tenants)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout.splitlines()[-1]))
    table = quota_table(
        args.tenants, rates=[1_000, 10_000], caches=[100, DEFAULT_CACHE, args.tenants]
    )
    print_results(results, table)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "what": "per-tenant keys, in process on InMemoryKms (no network, no broker)",
        "machine": machine_info(),
        "cases": results,
        "quota_arithmetic": table,
        "quota_rule": quota_table.__doc__,
    }
    path = args.out / "tenants.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
