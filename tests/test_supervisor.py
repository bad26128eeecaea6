"""`workers.supervisor`: the one process launcher (spawn, wait, stop, log tail, records)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.errors import ServiceError
from tests import kit
from workers.supervisor import Child, log_tail, until, wait_until


async def test_a_child_writes_its_log_and_reports_its_exit_code(tmp_path: Path) -> None:
    child = Child.spawn(
        [sys.executable, "-c", "print('hello from the child'); raise SystemExit(3)"],
        name="the test child",
        log=tmp_path / "child.log",
    )
    assert await child.wait(30) == 3
    assert child.logged("hello from the child")
    assert "hello from the child" in child.tail()
    assert child.exited_error("early").args[0].startswith("the test child exited with code 3")


async def test_stop_sends_sigterm_then_sigkill(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    child = Child.spawn([sys.executable, "-c", stubborn], name="stubborn", log=tmp_path / "s.log")
    assert await until(lambda: child.logged("up"), 10)
    assert await child.stop(grace=0.5) == -9  # it ignored SIGTERM
    assert not kit.running(child.pid)


def test_a_detached_child_is_found_again_only_by_its_record(tmp_path: Path) -> None:
    child = Child.spawn(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        name="detached",
        log=tmp_path / "d.log",
        detached=True,
    )
    record = child.record(port=1234, name="svc")
    assert record.is_alive()
    forged = type(record)(**{**record.__dict__, "identity": "1"})  # a recycled PID
    assert not forged.is_alive()
    assert not forged.stop()  # never signalled
    assert record.stop(grace=5) is True
    assert not record.is_alive()
    assert not kit.running(child.pid)


def test_a_missing_program_is_a_service_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="cannot start nothing-here"):
        Child.spawn(["/nonexistent/binary"], name="nothing-here", log=tmp_path / "n.log")


def test_log_tail_and_wait_until(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert "unreadable" in log_tail(log)
    log.write_text("")
    assert "empty" in log_tail(log)
    log.write_text("\n".join(f"line {n}" for n in range(50)))
    tail = log_tail(log, lines=3)
    assert "line 49" in tail
    assert "line 46" not in tail
    assert wait_until(lambda: True, 0.1)
    assert not wait_until(lambda: False, 0.1)
