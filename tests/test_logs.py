"""Logging: JSON lines with stable fields, and the AWS SDK never at DEBUG."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from workers.runtime import JSON_LOG_FIELDS, configure_logging

_TOUCHED = ("", "envpipe", "pipeline", "workers", "botocore", "aiobotocore", "urllib3")


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    saved = {name: logging.getLogger(name).level for name in _TOUCHED}
    handlers = logging.getLogger().handlers[:]
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger().handlers[:] = handlers


@pytest.mark.usefixtures("restored_logging")
def test_json_lines_have_the_stable_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", "json")
    logging.getLogger("envpipe.stream").debug("batch of %d records", 7)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("envpipe.stream").exception("a batch failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["batch of 7 records", "a batch failed"]
    for line in lines:
        assert tuple(line)[: len(JSON_LOG_FIELDS)] == JSON_LOG_FIELDS
        assert line["logger"] == "envpipe.stream"
        assert line["ts"].endswith("+00:00")
    assert lines[1]["level"] == "ERROR"
    assert lines[1]["error"] == "ValueError: boom"
    assert "Traceback" in lines[1]["traceback"]


@pytest.mark.usefixtures("restored_logging")
def test_debug_is_ours_only_never_the_aws_sdk(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", "text")
    logging.getLogger("botocore.parsers").debug("Response body: {'Plaintext': 'DEK'}")
    logging.getLogger("aiokafka.conn").debug("chatty third-party detail")
    logging.getLogger("pipeline.cache").debug("minted a data key")
    logging.getLogger("botocore.credentials").warning("credentials expire soon")
    err = capsys.readouterr().err
    assert "Response body" not in err
    assert "chatty" not in err
    assert "minted a data key" in err
    assert "credentials expire soon" in err
