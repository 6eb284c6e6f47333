"""A fixed or changed data file redoes only its own units: the run directory keeps every other committed unit,
and the final rows equal those of an uninterrupted run on the data as it now is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import base_config
from reference import read_rows

from saeray import cli
from saeray.engine.units import UNITS_PER_FILE


def _corrupt_pages(path: Path) -> None:
    """Garbage in the middle of every row group's text column chunk; the footer stays intact (planning works,
    reading the rows fails)."""
    md = pq.ParquetFile(path).metadata
    raw = bytearray(path.read_bytes())
    for g in range(md.num_row_groups):
        col = md.row_group(g).column(0)
        end = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size
        raw[end - 20:end - 4] = b"\xff" * 16  # inside the last page's compressed values
    path.write_bytes(bytes(raw))


def _run(tmp_path: Path, raw: dict, capsys, *extra: str, local: bool = True) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(path), *(["--local"] if local else []), *extra])
    return code, capsys.readouterr().err


def _raw(tiny, data: Path, out: Path, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out, **over)


def _markers(run: Path) -> dict[int, int]:
    """unit id -> the marker's modification time (ns): a unit redone gets a new marker."""
    return {int(p.stem): p.stat().st_mtime_ns for p in (run / "completions").glob("*.json")}


def _by_file(markers: dict[int, int], file: int) -> dict[int, int]:
    return {u: t for u, t in markers.items() if u // UNITS_PER_FILE == file}


def _same_rows(run: Path, ref: Path) -> None:
    got, want = read_rows(run), read_rows(ref)
    assert got.height > 0 and got.equals(want)


@pytest.mark.parametrize("local", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fixing_a_corrupt_file_redoes_only_its_units(tiny, tmp_path, capsys, local, request):
    if not local:
        request.getfixturevalue("ray_session")
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    good = (data / "part-1.parquet").read_bytes()
    _corrupt_pages(data / "part-1.parquet")
    run = tmp_path / "run"
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys, local=local)
    assert code == 1 and "part-1.parquet: row group" in err and "the file is corrupt" in err, err
    assert "Traceback" not in err
    before = _markers(run)
    assert before and not _by_file(before, 1) and _by_file(before, 0) and _by_file(before, 2)

    (data / "part-1.parquet").write_bytes(good)  # fixed: same size, new mtime, so a new identity
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys, local=local)
    assert code == 0, err
    after = _markers(run)
    assert {u: t for u, t in after.items() if u // UNITS_PER_FILE != 1} == before  # the others were not redone
    assert _by_file(after, 1)

    ref = tmp_path / "ref"
    assert _run(tmp_path, _raw(tiny, data, ref), capsys)[0] == 0
    _same_rows(run, ref)


def _rewrite(path: Path) -> None:
    """Another valid content: the same rows in reverse order."""
    t = pq.read_table(path)
    pq.write_table(t.take(pa.array(list(range(t.num_rows))[::-1])), path, row_group_size=7)


def test_a_changed_file_redoes_its_units_and_drops_the_run_tables(tiny, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    run = tmp_path / "run"
    assert _run(tmp_path, _raw(tiny, data, run), capsys)[0] == 0
    assert cli.main(["stats", str(run)]) == 0
    before = _markers(run)
    _rewrite(data / "part-2.parquet")
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys)
    assert code == 0, err
    assert "redoing the units of part-2.parquet (1 committed units), keeping the other 2" in caplog.text
    after = _markers(run)
    assert {u: t for u, t in after.items() if u // UNITS_PER_FILE != 2} == _by_file(before, 0) | _by_file(before, 1)
    assert set(_by_file(after, 2)) == set(_by_file(before, 2))
    assert all(after[u] != before[u] for u in _by_file(after, 2))
    assert not (run / "features.parquet").exists()  # statistics of the old data are gone with it
    ref = tmp_path / "ref"
    assert _run(tmp_path, _raw(tiny, data, ref), capsys)[0] == 0
    _same_rows(run, ref)


def test_under_a_budget_the_files_after_a_changed_one_are_redone(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    run = tmp_path / "run"
    raw = _raw(tiny, data, run, data__max_tokens=10**6)  # more than the data holds: every file counts
    assert _run(tmp_path, raw, capsys)[0] == 0
    before = _markers(run)
    _rewrite(data / "part-1.parquet")
    code, err = _run(tmp_path, raw, capsys)
    assert code == 0, err
    after = _markers(run)
    assert _by_file(after, 0) == _by_file(before, 0)
    assert all(after[u] != before[u] for u in before if u // UNITS_PER_FILE >= 1)
    ref = tmp_path / "ref"
    assert _run(tmp_path, _raw(tiny, data, ref, data__max_tokens=10**6), capsys)[0] == 0
    _same_rows(run, ref)


def test_other_changes_are_still_refused(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    run = tmp_path / "run"
    assert _run(tmp_path, _raw(tiny, data, run), capsys)[0] == 0
    before = _markers(run)
    shutil.copy(data / "part-2.parquet", data / "part-3.parquet")  # a new file shifts nothing but is not a fix
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys)
    assert code == 2 and "fingerprint" in err and "--overwrite" in err, err
    (data / "part-3.parquet").unlink()
    sae = tmp_path / "sae"
    shutil.copytree(tiny["sae_standard"], sae)
    code, err = _run(tmp_path, base_config(tiny["llama"], [{"name": "a", "path": str(sae)}], data, run), capsys)
    assert code == 2 and "fingerprint" in err, err  # another SAE: every committed unit holds the old one's codes
    assert _markers(run) == before
