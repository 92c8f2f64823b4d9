"""Finished cells carried to another machine (``table2 --export-cells`` / ``--import-cells``):
taken only where the record made there is the same record, with the same settings; the table
they give is the uninterrupted run's, to the last digit."""

import json
import logging

import pandas as pd
import pytest
import torch

from pgbd_defense.experiments import table2
from pgbd_defense.experiments.archive import content_fingerprint, record_fingerprint

from . import tiny_table

NUMBERS = tiny_table.NUMBERS
_argv, _cells = tiny_table.argv, tiny_table.defense_cells


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    tiny_table.use_in_test(monkeypatch)


@pytest.fixture
def first_machine(tmp_path, tiny_data):
    """FT's two cells finished on "another machine" (its own record root) and archived."""
    archive = tmp_path / "cells.json"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_a", tmp_path / "a", "--defenses", "ft",
                             "--export-cells", str(archive))) == 0
    return archive


def test_imported_cells_are_not_rerun_and_give_the_uninterrupted_table(tmp_path, tiny_data, first_machine, caplog):
    entries = json.loads(first_machine.read_text())["cells"]
    assert len(entries) == 2 and all(e["summary"]["defense"] == "ft" for e in entries)
    # the uninterrupted reference: every cell on one record root
    assert table2.main(_argv(tiny_data, tmp_path / "rec_ref", tmp_path / "ref")) == 0
    # a fresh record root: the record is made again (same settings, same thread count: the same record)
    caplog.set_level(logging.INFO)
    out = tmp_path / "b"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_b", out, "--import-cells", str(first_machine),
                             "--export-cells", str(tmp_path / "all.json"))) == 0
    cells, ref = _cells(out), _cells(tmp_path / "ref")
    assert list(cells.loc["ft", "status"]) == ["cached", "cached"]  # imported, not run
    assert list(cells.loc["pgbd", "status"]) == ["ok", "ok"]
    assert caplog.text.count("imported from") == 2
    pd.testing.assert_frame_equal(cells[NUMBERS], ref[NUMBERS], check_exact=True)
    assert (out / "table2.csv").read_text() == (tmp_path / "ref" / "table2.csv").read_text()
    # the archive written after the import holds all four cells; importing into a finished table changes nothing
    assert len(json.loads((tmp_path / "all.json").read_text())["cells"]) == 4
    assert table2.main(_argv(tiny_data, tmp_path / "rec_b", tmp_path / "c", "--import-cells",
                             str(tmp_path / "all.json"))) == 0
    assert set(_cells(tmp_path / "c")["status"]) == {"cached"}


def test_cells_of_another_record_are_refused_and_run(tmp_path, tiny_data, first_machine, caplog):
    archive = json.loads(first_machine.read_text())
    for entry in archive["cells"]:  # as if the first machine's CPU had trained another model
        entry["record_fingerprint"] = "0" * 64
    first_machine.write_text(json.dumps(archive))
    out = tmp_path / "b"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_b", out, "--import-cells", str(first_machine))) == 0
    assert set(_cells(out)["status"]) == {"ok"}  # every cell ran
    assert caplog.text.count("the record here differs from the one the cell ran on") == 2


def test_cells_of_other_settings_are_not_taken(tmp_path, tiny_data, first_machine, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "b"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_b", out, "--defenses", "ft", "--set", "lr=0.001",
                             "--import-cells", str(first_machine))) == 0
    assert set(_cells(out)["status"]) == {"ok"} and "imported from" not in caplog.text
    assert "2 archived cells, 2 of them not in this table" in caplog.text


def test_exporting_a_slice_to_the_file_it_imported_from_keeps_the_rest(tmp_path, tiny_data, first_machine):
    # the archive holds FT's cells; a PGBD-only slice is run and exported to the same file
    assert table2.main(_argv(tiny_data, tmp_path / "rec_b", tmp_path / "b", "--defenses", "pgbd",
                             "--import-cells", str(first_machine), "--export-cells", str(first_machine))) == 0
    defenses = sorted(e["summary"]["defense"] for e in json.loads(first_machine.read_text())["cells"])
    assert defenses == ["ft", "ft", "pgbd", "pgbd"]


@pytest.mark.parametrize("text, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ('{"format": "something else", "version": 1, "cells": []}', "not a cell archive of version 1"),
    ('{"format": "pgbd-defense cell archive", "version": 1, "cells": [{"key": 3}]}', "a malformed cell entry"),
])
def test_a_bad_archive_fails_in_one_line_and_runs_nothing(tmp_path, tiny_data, caplog, text, message):
    path = tmp_path / "cells.json"
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    assert table2.main(_argv(tiny_data, tmp_path / "rec", out, "--import-cells", str(path))) == 2
    assert message in caplog.text and len(caplog.records) == 1
    assert not out.exists() and not (tmp_path / "rec").exists()


def test_the_fingerprint_sees_one_changed_weight_and_its_cache_follows_the_file(tmp_path):
    state = {"model": {"a.weight": torch.randn(3, 3), "a.bias": torch.zeros(3)},
             "bd_test": {"x": torch.randint(0, 255, (4, 1, 2, 2), dtype=torch.uint8), "original_index": [0, 1]},
             "data_path": "/here"}
    record = tmp_path / "rec"
    record.mkdir()
    torch.save(state, record / "attack_result.pt")
    first = record_fingerprint(record)
    assert first == content_fingerprint(state) and (record / "fingerprint.json").is_file()
    # the same content under another path and written again: the same record
    torch.save({**state, "data_path": "/elsewhere"}, record / "attack_result.pt")
    assert record_fingerprint(record) == first
    # one weight nudged by one ulp: another record, and the cached value is not reused
    state["model"]["a.weight"][1, 2] = torch.nextafter(state["model"]["a.weight"][1, 2], torch.tensor(9.0))
    torch.save(state, record / "attack_result.pt")
    assert record_fingerprint(record) != first
    # the key order of a dict does not matter; the order of a list does
    assert content_fingerprint({"m": {"b": torch.ones(1), "a": torch.zeros(1)}}) == \
        content_fingerprint({"m": {"a": torch.zeros(1), "b": torch.ones(1)}})
    assert content_fingerprint({"m": [torch.ones(1), torch.zeros(1)]}) != \
        content_fingerprint({"m": [torch.zeros(1), torch.ones(1)]})
