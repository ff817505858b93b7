"""``python -m bank.tools.commit_pages``: it runs, its pages add up, and it shows what
schema 6 is for (entries' uniqueness index takes no random page per posting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bank.tools import commit_pages


def test_a_commits_pages_are_counted_by_b_tree(tmp_path: Path):
    result = commit_pages.measure(tmp_path, grow=40, batches=5, size=50)
    by_tree = result["by_tree"]
    assert result["entries_before"] == 2000 and result["batches"] == 5
    assert sum(by_tree.values()) == pytest.approx(result["pages_per_commit"], abs=0.5)
    # The random transaction ids spread over the id's index, one leaf for several
    # postings; entries name their transaction by its ascending number, so their
    # uniqueness index (txn_no, account) is written at its right edge (a leaf, and now and
    # then the page above a split): a fraction of the id's pages, where it was as many.
    by_id = by_tree["sqlite_autoindex_transactions_1"]
    assert by_id >= 5
    assert by_tree.get("sqlite_autoindex_entries_1", 0) * 3 <= by_id
    assert result["commit_cpu_ms_median"] > 0


def test_the_command_prints_a_table_then_json(capsys: pytest.CaptureFixture[str]):
    assert commit_pages.main(["--grow", "2", "--batches", "2", "--batch", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ms") and "pages per COMMIT of 5 postings after 10 entries" in out[0]
    assert json.loads(out[-1])["batch_postings"] == 5


def test_nonsense_sizes_are_refused(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_:
        commit_pages.main(["--batches", "0"])
    assert exit_.value.code == 2
    assert "--batches and --batch 1 or more" in capsys.readouterr().err
