"""The baseline workers: the stream workers' own loop with sealing replaced by a copy.

`passthrough` copies each value; `passthrough_padded` appends as many bytes as envpipe's
envelope adds, to separate what bigger records cost the broker from what our CPU costs.
Both run `workers.stream`'s generic loop, so the only difference from `envpipe encrypt` is
the transform. Run as `python -m benchmarks.pipeline_worker MODE --source ... --dest ...`;
settings come from the `ENVPIPE_*` environment like the real workers', and the stats file
from `ENVPIPE_STATS_FILE`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pipeline.config import load_settings
from workers import stream
from workers.transforms import Outcome, Transform


class Padded(Transform):
    """A copy plus `pad` bytes: the envelope's size without its CPU cost."""

    direction = "passthrough_padded"

    def __init__(self, pad: int) -> None:
        self._pad = b"\0" * pad

    async def values(self, records: Sequence[Any]) -> Sequence[Outcome]:
        pad = self._pad
        return [record.value + pad for record in records]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one baseline worker until it is idle."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_worker")
    parser.add_argument("mode", choices=["passthrough", "passthrough_padded"])
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--pad", type=int, default=0, help="bytes appended (padded mode)")
    parser.add_argument("--stop-when-idle", type=float, default=None)
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.mode == "passthrough":
        return stream.run_passthrough(
            settings,
            source=args.source,
            dest=args.dest,
            group=args.group,
            stop_when_idle=args.stop_when_idle,
        )
    return stream.run_transform(
        settings,
        Padded(args.pad),
        source=args.source,
        dest=args.dest,
        group=args.group,
        stop_when_idle=args.stop_when_idle,
    )


if __name__ == "__main__":
    raise SystemExit(main())
