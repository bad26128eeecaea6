"""KMS providers behind `pipeline.types.Kms`.

`AwsKms` is imported on first use, so code that only needs the in-memory KMS (unit tests,
`inspect`) does not pay for importing aiobotocore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.kms.counting import CountingKms
from pipeline.kms.memory import InMemoryKms

if TYPE_CHECKING:
    from pipeline.kms.aws import AwsKms

__all__ = ["AwsKms", "CountingKms", "InMemoryKms"]


def __getattr__(name: str) -> object:
    if name == "AwsKms":
        return importlib.import_module("pipeline.kms.aws").AwsKms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
