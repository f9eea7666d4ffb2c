"""Ctrl-C / SIGTERM handling of a run: cells marked at once, Tune stopped, Interrupted raised."""

import os
import signal

import pytest

from tbr_ray import results
from tbr_ray.interrupt import (
    TUNE_ENV,
    Interrupted,
    RunInterrupt,
    mark_interrupted,
)


def _running(tmp_path):
    results.write_status(tmp_path, "a", "running", stage="train", mix="/m")
    results.write_status(tmp_path, "b", "done")


def test_mark_interrupted_keeps_stage_and_info(tmp_path):
    _running(tmp_path)
    assert mark_interrupted(tmp_path, "SIGTERM received") == ["a"]
    row = results.read_status(tmp_path).set_index("cell_id").loc["a"]
    assert (row["status"], row["stage"], row["mix"]) == ("interrupted", "train", "/m")
    assert row["reason"] == "SIGTERM received"
    assert results.is_done(tmp_path, "b")


def test_signal_outside_a_graceful_section_stops_at_once(tmp_path):
    _running(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), RunInterrupt(tmp_path) as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT and stop.cells == ["a"]
    assert signal.getsignal(signal.SIGINT) is before and TUNE_ENV not in os.environ
    with pytest.raises(Interrupted) as err:
        stop.raise_if_stopped()
    assert err.value.exit_code == 130 and err.value.cells == ["a"]


def test_signal_in_a_graceful_section_stops_tune_then_raises(tmp_path):
    _running(tmp_path)
    with RunInterrupt(tmp_path) as stop:
        assert os.environ[TUNE_ENV] == "1"  # Tune must not take SIGINT over
        stopper = stop.stopper()
        with stop.graceful():
            assert not stopper.stop_all()
            os.kill(os.getpid(), signal.SIGTERM)  # no exception: Tune winds down
            assert stopper.stop_all()
        # a trial wrote `running` after the signal: marked too when the section ends
        results.write_status(tmp_path, "c", "running", stage="data")
        with pytest.raises(Interrupted) as err:
            stop.raise_if_stopped()
    assert err.value.exit_code == 143 and err.value.cells == ["a", "c"]
    assert set(results.read_status(tmp_path)["status"]) == {"interrupted", "done"}
