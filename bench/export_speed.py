"""Wall time of `saeray export neuronpedia` with this checkout's saeray/report/export.py against another commit's.

    python -m saeray.cli demo --out /tmp/exportbench/demo             # a run to export (~1-2 minutes)
    python bench/export_speed.py /tmp/exportbench/demo/run-prose      # reference: export.py at main
    python bench/export_speed.py RUN --ref HEAD~1 --features 512      # another reference, fewer features

Each export runs in a process of its own (imports and the model's loading included, as the command pays them):
the reference is this checkout with only saeray/report/export.py replaced by `git show REF:saeray/report/export.py`
(loaded as a module beside the real one), so both read the run with the same analysis code. The files of both,
parsed as JSON, must be equal (else the first difference is shown); files equal as JSON but not as bytes (the
reference wrote spaces after separators) are counted. Writes the figures
to bench/export_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a child process: load export.py from `source` (a file) as saeray.report.<name>, export, print seconds.
CHILD = """
import importlib.util, json, sys, time
started = time.perf_counter()
source, name, run, out, features = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("saeray.report." + name, source)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
t = time.perf_counter()
files = module.neuronpedia(run, out, features=None if features == "all" else list(range(int(features))))
print(json.dumps({"export_s": time.perf_counter() - t, "process_s": time.perf_counter() - started,
                  "files": len(files)}))
"""


def export(source: Path, name: str, run: str, out: Path, features: str) -> dict:
    """Run one export in a process of its own; its timings, plus the wall time of the whole process."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), name, run, str(out), features],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"the {name} export failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t}


def first_difference(a: object, b: object, where: str = "") -> str | None:
    """Where two parsed JSON values first differ (None: equal)."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} {a!r:.80} vs {type(b).__name__} {b!r:.80}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{where}: keys {list(a)} vs {list(b)}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def compare(ref: Path, new: Path) -> tuple[list[str], int]:
    """(differences between the files of two export folders, parsed as JSON; the number of files whose bytes differ
    though they parse equal, e.g. JSON written without spaces)."""
    names = sorted(p.name for p in ref.iterdir())
    if names != sorted(p.name for p in new.iterdir()):
        return [f"files differ: {names} vs {sorted(p.name for p in new.iterdir())}"], 0
    out, formatting = [], 0
    for name in names:
        a, b = (ref / name).read_bytes(), (new / name).read_bytes()
        if a != b:
            diff = first_difference(json.loads(a), json.loads(b))
            if diff:
                out.append(f"{name}: {diff}")
            else:
                formatting += 1
    return out, formatting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run directory (saeray demo's run-prose, for one)")
    p.add_argument("--ref", default="main", help="the commit whose export.py is the reference (default main)")
    p.add_argument("--features", default="all", help="export features 0..N-1 only (default all)")
    p.add_argument("--json", default=str(ROOT / "bench" / "export_speed.json"), help="where the figures go")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="export_speed_") as tmp:
        old_src = Path(tmp) / "export_ref.py"
        old_src.write_text(subprocess.run(["git", "show", f"{a.ref}:saeray/report/export.py"], cwd=ROOT, check=True,
                                          capture_output=True, text=True).stdout)
        load = os.getloadavg()[0]
        new = export(ROOT / "saeray" / "report" / "export.py", "export_new", a.run, Path(tmp) / "new", a.features)
        print(f"new: {new['export_s']:.1f} s in neuronpedia(), {new['wall_s']:.1f} s for the process", flush=True)
        old = export(old_src, "export_ref", a.run, Path(tmp) / "ref", a.features)
        print(f"{a.ref}: {old['export_s']:.1f} s in neuronpedia(), {old['wall_s']:.1f} s for the process", flush=True)
        differences, formatting = compare(Path(tmp) / "ref", Path(tmp) / "new")
        written = sum(f.stat().st_size for f in (Path(tmp) / "new").iterdir())
        ref_written = sum(f.stat().st_size for f in (Path(tmp) / "ref").iterdir())
    figures = {
        "command": " ".join(["bench/export_speed.py", *(Path(x).name if x == a.run else x for x in sys.argv[1:])]),
        "run": Path(a.run).name, "ref": a.ref, "features": a.features, "batch_files": new["files"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "ref_export_s": round(old["export_s"], 2), "new_export_s": round(new["export_s"], 2),
        "ref_process_s": round(old["wall_s"], 2), "new_process_s": round(new["wall_s"], 2),
        "speedup": round(old["export_s"] / new["export_s"], 1), "bytes_written": written,
        "ref_bytes_written": ref_written, "identical": not differences,
        "files_equal_as_json_not_bytes": formatting, "differences": differences,
    }
    Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"speedup {figures['speedup']}x, {written:,} bytes written, "
          + ("files equal as JSON" if not differences
             else f"{len(differences)} files differ:\n  " + "\n  ".join(differences)))
    print(f"figures in {a.json}")
    if differences:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
