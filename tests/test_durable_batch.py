"""DurableBatch (the run directory's writes of a unit, flushed to disk together) and the merge that copies the
parts' rows: the same guarantees and the same bytes as writing one by one and parsing every row again."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from initlab.lab import rundir
from initlab.lab._io import TMP_PREFIX, csv_text
from initlab.lab.rundir import DurableBatch


def _leftovers(root):
    return sorted(p.name for p in root.rglob(f"{TMP_PREFIX}*"))


def test_nothing_appears_before_commit_then_everything(tmp_path, monkeypatch):
    synced, threads = [], set()
    real = os.fsync

    def fsync(fd):
        synced.append(fd)
        threads.add(threading.get_ident())
        time.sleep(0.01)  # the flushes overlap
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("old")
    with DurableBatch() as batch:
        for name in ("a", "b"):
            with batch.dir(tmp_path / name, replace=True) as d:
                (d / "x.txt").write_text(name)
                (d / "y.txt").write_text(name * 2)
        batch.file(tmp_path / "f.csv", b"1,2\n")
        assert not (tmp_path / "a").exists() and not (tmp_path / "f.csv").exists()
        assert (tmp_path / "b" / "old.txt").read_text() == "old"
    assert (tmp_path / "a" / "y.txt").read_text() == "aa" and (tmp_path / "f.csv").read_bytes() == b"1,2\n"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x.txt", "y.txt"]
    assert len(synced) >= 5 and len(threads) >= 2  # 5 files (and the parent folder), from a pool
    assert not _leftovers(tmp_path)


def test_what_was_complete_is_kept_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with DurableBatch() as batch:
            with batch.dir(tmp_path / "done") as d:
                (d / "x").write_text("x")
            with batch.dir(tmp_path / "half") as d:
                (d / "x").write_text("x")
                raise KeyboardInterrupt
    assert (tmp_path / "done" / "x").read_text() == "x"
    assert not (tmp_path / "half").exists() and not _leftovers(tmp_path)


def test_a_full_disk_names_the_target_and_leaves_the_old_content(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        with DurableBatch() as batch:
            with batch.dir(tmp_path / "m", replace=True) as d:
                (d / "new").write_text("new")
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "m") in str(e.value.filename)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep"] and not _leftovers(tmp_path)


def test_an_existing_folder_is_not_replaced_unless_asked(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError):
        with DurableBatch() as batch:
            with batch.dir(tmp_path / "m") as d:
                (d / "new").write_text("new")
    assert not list((tmp_path / "m").iterdir()) and not _leftovers(tmp_path)


# ----------------------------------------------------------------------------- the merge's copied rows

_COLUMNS = ("scenario", "seed", "step", "split", "metric", "value")


def _write_parts(root, rng, *, awkward: bool):
    parts, rows_all = [], []
    names = ["relu-he", "sig,moid", 'q"uote', "line\nbreak", " space "] if awkward else ["relu-he", "sigmoid-xavier"]
    for k in range(4):
        part = root / f"p{k}"
        part.mkdir()
        (part / "member.json").write_text("{}")
        rows = [{"scenario": rng.choice(names), "seed": k, "step": s, "split": rng.choice(["train", "test"]),
                 "metric": "acc", "value": rng.choice([rng.random(), float("nan"), None, 1e-300, -0.0])}
                for s in range(rng.randrange(0, 6))]
        (part / "metrics.csv").write_text(csv_text(rows, _COLUMNS))
        parts.append(part)
        rows_all += rows
    return parts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("awkward", [False, True])
def test_merged_rows_are_those_parsed_and_written_again(tmp_path, monkeypatch, seed, awkward):
    """The copy (plain rows) and the parse (quoted names, line breaks) give the bytes the merge always wrote:
    every part's rows parsed and written again under one header; plain rows are copied, never parsed."""
    parts = _write_parts(tmp_path, random.Random(seed), awkward=awkward)
    rows = [r for p in parts for r in rundir.read_part_csv(p, "metrics.csv")[1]]
    want = csv_text(rows, _COLUMNS)
    parsed = []
    real = rundir.read_part_csv
    monkeypatch.setattr(rundir, "read_part_csv", lambda part, name: parsed.append(part) or real(part, name))
    assert rundir._merged(parts, "metrics.csv", _COLUMNS, _COLUMNS) == want
    assert bool(parsed) == awkward  # awkward names are quoted: those parts are parsed


def test_merged_first_pass_columns_differ_between_parts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.mkdir()
    (a / "first_pass.csv").write_text(csv_text([{"scenario": "x", "seed": 0, "scheme": "he", "u": 1}],
                                               ["scenario", "seed", "scheme", "u"]))
    (b / "first_pass.csv").write_text(csv_text([{"scenario": "y", "seed": 1, "scheme": "he", "v": 2}],
                                               ["scenario", "seed", "scheme", "v"]))
    got = rundir._merged([a, b], "first_pass.csv", None, rundir.FIRST_PASS_LEAD)
    assert got == "scenario,seed,scheme,u,v\nx,0,he,1,\ny,1,he,,2\n"
    assert rundir._merged([], "first_pass.csv", None, rundir.FIRST_PASS_LEAD) == "scenario,seed,scheme\n"
