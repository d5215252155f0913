"""A driver SIGKILLed while Tune copies its experiment snapshot leaves a cut JSON file; the study
keeps the last snapshot that read back whole and puts it back before ``--resume`` (fast: the
files Tune writes, without a Ray run; the end-to-end kills are in test_fault_killed_driver.py)."""
from __future__ import annotations

import json

from studies.snapshots import LAST_GOOD, KeepLastGoodSnapshot, repair_snapshot


def test_a_cut_snapshot_is_replaced_by_the_last_good_one(tmp_path):
    snapshot = tmp_path / "experiment_state-2026-12-06_08-00-00.json"
    keeper = KeepLastGoodSnapshot(str(tmp_path))
    keeper.on_step_end(0, [])  # no snapshot yet: nothing to keep
    assert not (tmp_path / LAST_GOOD).exists()

    snapshot.write_text(json.dumps({"trial_data": ["a"]}))
    keeper.on_step_end(1, [])
    assert json.loads((tmp_path / LAST_GOOD).read_text()) == {"trial_data": ["a"]}
    assert repair_snapshot(str(tmp_path)) is None  # a whole snapshot is left alone

    snapshot.write_text('{"trial_data": ["a", "b"')  # being written (or cut): never kept
    keeper.on_step_end(2, [])
    assert json.loads((tmp_path / LAST_GOOD).read_text()) == {"trial_data": ["a"]}

    note = repair_snapshot(str(tmp_path))
    assert note and snapshot.name in note and "\n" not in note
    assert json.loads(snapshot.read_text()) == {"trial_data": ["a"]}


def test_without_a_good_copy_a_cut_snapshot_is_left_to_tune(tmp_path):
    snapshot = tmp_path / "experiment_state-2026-12-06_08-00-00.json"
    snapshot.write_text("{")
    assert repair_snapshot(str(tmp_path)) is None and snapshot.read_text() == "{"
