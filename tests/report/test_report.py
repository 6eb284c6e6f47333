"""`saeray report`: a run, a diff, a separation and a category heatmap, opened in headless Chromium.

The page is loaded over the Chrome DevTools Protocol so that JavaScript exceptions, console
errors, dialogs and every request the page makes are recorded; the plots' data is read back
from the page and checked against the run's raw files. A document containing
`<script>alert(1)</script>` and a category named `<img src=x onerror=alert(2)>` must show as text.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import base_config, canonical_doc_ids, corpus, write_dataset

from saeray import cli
from saeray.analysis.separate import write_separation
from saeray.engine import config
from saeray.executors import run

EVIL_DOC = "<script>alert(1)</script>"
EVIL_CATEGORY = "<img src=x onerror=alert(2)>"
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Chromium:
    """Headless Chromium driven over the DevTools Protocol (one page, events recorded)."""

    def __init__(self, exe: str, profile: Path):
        import websocket  # websocket-client

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1400,1000", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start (exit status {self.proc.poll()})")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=True)

    def send(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> None:
        """Navigate (forgetting earlier events) and wait until the page's script reports its plots drawn or failed."""
        self.events = []
        self.send("Page.navigate", {"url": url}, session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.eval("document.readyState === 'complete' && document.body && "
                              "(document.body.getAttribute('data-plots-rendered') || "
                              "document.body.getAttribute('data-plot-error'))")
            if state:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{url}: plots not drawn after {timeout}s")

    def screenshot(self, path: Path) -> None:
        import base64

        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("chromium is not installed but CI is set: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the report page cannot be opened")
    pytest.importorskip("websocket", reason="websocket-client (the test extra) is needed to talk to chromium")
    b = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict:
    """Run A (llama) and B (gemma3) with one SAE over a corpus with a hostile document and category."""
    root = tmp_path_factory.mktemp("report")
    sae = root / "sae"
    shutil.copytree(tiny["sae_topk"], sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["neuronpedia_id"] = "tiny/2-res-topk"
    (sae / "cfg.json").write_text(json.dumps(cfg))
    docs = corpus(40, seed=5) + [f"def {EVIL_DOC} return class"]
    kinds = ["code" if i % 2 else "prose" for i in range(40)] + [EVIL_CATEGORY]
    data = write_dataset(root / "data", docs, 2, {"kind": kinds, "label": [i % 3 == 0 for i in range(41)]})
    out = {"root": root, "evil_doc": canonical_doc_ids(data)[40]}  # the last row of the second file
    for name, model in (("a", tiny["llama"]), ("b", tiny["gemma3"])):
        c = base_config(model, [{"name": "s", "path": str(sae)}], data, root / name, data__keep_columns=["kind", "label"])
        run(config.from_dict(c), executor="local")
        out[name] = root / name
    write_separation(out["a"], root / "sep", label="label")
    out["sep"] = root / "sep"
    return out


def _rows(run_dir: Path) -> pl.DataFrame:
    return pl.read_parquet(str(run_dir / "activations" / "**" / "*.parquet"))


@pytest.fixture(scope="module")
def report(runs) -> dict:
    """The full report through the CLI, with the card feature chosen so the hostile document is a top context."""
    rows = _rows(runs["a"])
    doc_max = rows.group_by("feature", "doc_id").agg(pl.col("value").max())
    ranked = doc_max.with_columns(pl.col("value").rank("ordinal", descending=True).over("feature").alias("rank"))
    evil = ranked.filter(pl.col("doc_id") == runs["evil_doc"]).sort("rank", "feature").row(0, named=True)
    out = runs["root"] / "out"
    code = cli.main(["report", str(runs["a"]), "--vs", str(runs["b"]), "--separation", str(runs["sep"]),
                     "--category", "kind", "--features", str(evil["feature"]), "--k", str(evil["rank"]),
                     "--before", "30", "--after", "30", "--out", str(out)])
    assert code == 0
    return {"out": out, "index": out / "index.html", "feature": evil["feature"]}


def test_page_renders_offline_without_errors(browser, report, runs):
    url = report["index"].resolve().as_uri()
    browser.open(url)
    if os.environ.get("SAERAY_REPORT_SCREENSHOT"):
        browser.screenshot(Path(os.environ["SAERAY_REPORT_SCREENSHOT"]))
    events = browser.events
    errors = [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert url in requests  # the recorder works: it saw the page itself
    assert [u for u in requests if u != url and not u.startswith(("data:", "blob:"))] == []
    assert not [e for e in events if e["method"] == "Page.javascriptDialogOpening"]
    assert browser.eval("document.body.getAttribute('data-plot-error')") is None
    expected = int(browser.eval("document.body.getAttribute('data-plots-expected')"))
    assert browser.eval("document.body.getAttribute('data-plots-rendered')") == str(expected)
    drawn = browser.eval("[...document.querySelectorAll('div.plot')].filter(d => d.classList.contains('js-plotly-plot')"
                         " && d.querySelector('svg.main-svg')).map(d => d.id)")
    assert len(drawn) == expected
    for name in ("density", "mean-density", "diff-scatter", "diff-classes", "diff-rho", "separation-scores",
                 "heatmap"):
        assert f"plot-{name}" in drawn
    assert sum(1 for d in drawn if d.startswith("plot-separation-")) >= 2  # scores + at least one feature
    assert sum(1 for d in drawn if d.startswith("plot-hist-")) == 1  # the one card
    assert browser.eval("document.querySelectorAll('#plot-diff-scatter .point').length") > 0
    # the log-scale view: the diff scatter's "log axes" button switches all six axes
    browser.eval("[...document.querySelectorAll('#plot-diff-scatter .updatemenu-button')].find(b => "
                 "b.textContent === 'log axes').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    time.sleep(0.5)
    types = browser.eval("['xaxis', 'yaxis', 'xaxis2', 'yaxis2', 'xaxis3', 'yaxis3'].map(a => "
                         "document.getElementById('plot-diff-scatter')._fullLayout[a].type)")
    assert types == ["log"] * 6
    assert [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"] == []


def _data(plot: str) -> str:
    """JS for a drawn plot's traces with arrays decoded (`_fullData`: plotly keeps numpy arrays base64 in `data`)."""
    return f"document.getElementById('plot-{plot}')._fullData"


def test_plot_data_matches_raw_rows(browser, report, runs):
    """The density histogram counts every alive feature; the diff's mean panel shows every feature nonzero in A or B."""
    browser.open(report["index"].resolve().as_uri())
    alive = _rows(runs["a"])["feature"].n_unique()
    counts = browser.eval(_data("density") + ".map(t => Array.from(t.y).reduce((a, b) => a + b, 0))")
    assert sum(counts) == alive
    fired = set(_rows(runs["a"])["feature"]) | set(_rows(runs["b"])["feature"])
    shown = browser.eval(_data("diff-scatter") +
                         ".filter(t => t.xaxis === 'x2' && t.mode === 'markers')"
                         ".map(t => Array.from(t.customdata, c => Number(c[0])))")
    assert sorted(int(f) for t in shown for f in t) == sorted(fired)
    classes = browser.eval("Array.from(" + _data("diff-classes") + "[0].y)")
    diff = pl.read_parquet(report["out"] / "diff" / "diff.parquet")
    assert sum(classes) == diff.height == 96
    n_docs = browser.eval(_data("heatmap") + "[0].z[0].length")
    assert n_docs == 41


def test_corpus_text_is_shown_as_text(browser, report):
    browser.open(report["index"].resolve().as_uri())
    html = report["index"].read_text()
    assert EVIL_DOC not in html and EVIL_CATEGORY not in html  # escaped everywhere, JSON included
    n_json = browser.eval("document.querySelectorAll('script[type=\"application/json\"]').length")
    assert browser.eval("document.scripts.length") == n_json + 2  # plotly.js + the drawing script, nothing else
    assert browser.eval("document.querySelectorAll('img').length") == 0
    contexts = browser.eval("[...document.querySelectorAll('.ctx')].map(d => d.textContent)")
    assert any(EVIL_DOC in c for c in contexts)
    ticks = browser.eval("[...document.querySelectorAll('#plot-heatmap .xtick text')].map(t => t.textContent)")
    assert {"code", "prose"} <= set(ticks)
    title = browser.eval("document.querySelector('#plot-heatmap .gtitle').textContent")
    assert f"{EVIL_CATEGORY} 1; code 20; prose 20" in title  # a plotly label, drawn as text
    assert browser.eval("document.querySelector('a[href^=\"https://www.neuronpedia.org/tiny/2-res-topk/\"]') !== null")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_png_figures(report):
    figs = report["out"] / "figures"
    names = {p.name for p in figs.glob("*.png")}
    want = {"density.png", "mean_vs_density.png", "diff_scatter.png", "diff_scatter_log.png", "diff_classes.png",
            "diff_rho.png", "separation_scores.png", "heatmap.png", f"feature_s_all_{report['feature']}.png"}
    assert want <= names
    assert any(n.startswith("separation_feature_") for n in names)
    for n in names:
        w, h = _png_size(figs / n)
        assert w >= 600 and h >= 300, (n, w, h)
    assert not [p for p in figs.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bad_choices_are_one_line_errors(runs, tmp_path, capsys):
    assert cli.main(["report", str(runs["a"]), "--sae", "nope", "--out", str(tmp_path)]) == 2
    assert "has (sae/group) s/all" in capsys.readouterr().err
    assert cli.main(["report", str(runs["a"]), "--separation", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no separation.parquet" in capsys.readouterr().err
    assert cli.main(["report", str(runs["a"]), "--features", "500", "--out", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_png_text_from_data_is_not_mathtext():
    from saeray.report.png import _text

    assert _text("$x$ costs $5") == r"\$x\$ costs \$5"
    assert _text("a\nb") == "a\u23ceb" and len(_text("x" * 100)) == 40


def test_feature_card_draws_any_script_without_warnings(tmp_path):
    """Thai, Hangul, CJK, Arabic and emoji tokens in a feature card: no missing-glyph warnings, and a
    character no installed font has is drawn as its UTF-8 bytes."""
    import warnings

    from saeray.report import fonts
    from saeray.report.data import Card
    from saeray.report.png import _text, feature_card

    tokens = ["สวัสดี", "안녕하세요", "日本語", "中文", "مرحبا", "\U0001F600", "plain", "naïve", "\u21b5"]
    logits = pl.DataFrame({"token": tokens, "token_id": list(range(len(tokens))),
                           "logit": np.linspace(-1, 1, len(tokens))})
    card = Card(sae="s", group="all", feature=3, run="r", why="test", stats={}, hist_edges=np.array([0.0, 1.0, 2.0]),
                hist_counts=np.array([3, 1]), logits=logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = feature_card(card, tmp_path / "card.png")
    assert path.is_file() and path.stat().st_size > 1000
    covered = fonts.coverage()
    assert ord("a") in covered
    for t in tokens:
        shown = _text(t)
        assert all(ord(c) in covered for c in shown), shown
        assert shown == t or "<" in shown  # drawn as is, or as bytes
    if ord("\U0001F600") not in covered:
        assert _text("\U0001F600") == "<f0 9f 98 80>"
    if "Noto Sans CJK JP" in fonts.families():  # the set-up's fonts are installed: CJK, Hangul, Thai draw as text
        assert all(_text(t) == t for t in tokens[:4])


def test_report_loads_no_model_unless_asked(runs, tmp_path, monkeypatch):
    """By default a report loads no model weights: cards show the logit effects saved with the run
    (save_logit_effects) and a note for the others; logits=True computes those; a file saved for another
    run is refused, not shown."""
    from saeray.analysis.saved_logits import read_logits
    from saeray.engine import models
    from saeray.report import write_report
    from saeray.tools import logits

    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    logits.save_logit_effects(run, [3, 5], k=8)
    logits.save_logit_effects(run, [3], k=8)  # replaces feature 3's rows
    saved = read_logits(run)
    assert saved.height == 2 * 2 * 8 and saved.filter(pl.col("feature") == 3).equals(
        logits.logit_effects_for_run(run, [3], k=8))

    def no_model(*args, **kwargs):
        raise AssertionError("the report loaded the model")

    with monkeypatch.context() as m:
        for name in ("load_model", "load_model_and_processor"):
            m.setattr(models, name, no_model)
        m.setattr(logits, "logit_effects_for_run", no_model)
        html = write_report(run, tmp_path / "out", features=[3, 4], top=2).read_text()
    assert html.count("Direct logit effects") == 1
    assert "logit effects not computed: they load the model" in html
    html = write_report(run, tmp_path / "out", features=[3, 4], logits=True).read_text()
    assert html.count("Direct logit effects") == 2 and "logit effects not computed" not in html

    other = tmp_path / "other"
    shutil.copytree(runs["b"], other)
    shutil.copy(run / "logits.parquet", other / "logits.parquet")
    with pytest.raises(ValueError, match="computed for another run"):
        read_logits(other)
    html = write_report(other, tmp_path / "out_other", features=[3]).read_text()
    assert "Direct logit effects" not in html and "logit effects not computed" in html


def test_logits_saved_with_fewer_ranks_than_a_card_shows_count_as_missing(runs, tmp_path):
    """A feature saved with k=3 has too few tokens for a card (LOGIT_RANKS): it is listed as missing, so a report
    computes it (logits=True) instead of showing 3 of the 8 tokens; one saved with k=8 is shown as saved."""
    from saeray.analysis.saved_logits import saved_effects
    from saeray.report.data import LOGIT_RANKS
    from saeray.tools import logits

    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    logits.save_logit_effects(run, [3], k=LOGIT_RANKS)
    logits.save_logit_effects(run, [5], k=3)
    saved, missing = saved_effects(run, [3, 5], sae="s", k=LOGIT_RANKS)
    assert missing == [5] and set(saved["feature"]) == {3} and saved.height == 2 * LOGIT_RANKS


def test_report_names_its_stages_as_they_start(runs, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="saeray.report.progress"):
        assert cli.main(["report", str(runs["a"]), "--vs", str(runs["b"]), "--out", str(tmp_path / "r")]) == 0
    stages = [r.getMessage() for r in caplog.records if r.name == "saeray.report.progress"]
    assert [s.split(" (elapsed")[0] for s in stages] == [
        "report: statistics and their figures", f"report: the diff against {runs['b']}",
        "report: 5 feature cards (top contexts, histograms, logit effects)"], stages
