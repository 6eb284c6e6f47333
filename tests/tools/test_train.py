"""`saeray train-sae` on a tiny model: sae-lens format, and figures recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import corpus, make_model, write_dataset

from saeray import cli
from saeray.assets.corpus import build, documents


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("train")
    model = make_model(root / "model", "llama", seed=4)
    data = write_dataset(root / "data", corpus(120, seed=8, min_words=10, max_words=60), n_files=3)
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(model), "dtype": "float32"}, "data": {"dataset": str(data)},
                                   "tokens": {"context_size": 32, "batch_tokens": 512}}))
    out = root / "sae"
    code = cli.main(["train-sae", str(cfg), "--hook", "blocks.2.hook_resid_post", "--out", str(out), "--d-sae", "128",
                     "--k", "8", "--train-tokens", "3000", "--epochs", "10", "--batch-size", "256", "--lr", "2e-3",
                     "--eval-tokens", "100000", "--held-out-fraction", "0.3"])
    assert code == 0
    return model, data, out


def test_trained_sae_loads_with_sae_lens_and_says_how_it_was_trained(trained):
    from sae_lens import SAE

    _, _, out = trained
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and sae.cfg.d_in == 64 and sae.cfg.d_sae == 128
    meta = sae.cfg.metadata
    assert meta.hook_name == "blocks.2.hook_resid_post" and meta.context_size == 32 and meta.prepend_bos is True


def test_held_out_figures_match_an_independent_computation(trained):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data, out = trained
    report = json.loads((out / "saeray_training.json").read_text())
    start, end = report["held_out_docs"]
    texts = [t for f in sorted(data.glob("*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sae = SAE.load_from_disk(out)
    xs = []
    with torch.no_grad():
        for text in texts[start:end]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), 31):
                window = [tok.bos_token_id] + ids[s:s + 31]
                h = model(torch.tensor([window]), output_hidden_states=True).hidden_states[3][0, 1:]
                keep = [j for j, t in enumerate(ids[s:s + 31]) if t not in tok.all_special_ids]
                xs.append(h[keep])
    x = torch.cat(xs)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    xn, xh = x.double().numpy(), x_hat.double().numpy()
    ev = 1 - ((xn - xh) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    held = report["held_out"]
    assert held["tokens"] == len(xn)
    assert held["explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert held["l0"] == pytest.approx(float((z != 0).sum(1).float().mean()), abs=1e-6)
    assert held["dead_fraction"] == pytest.approx(float(((z != 0).sum(0) == 0).float().mean()))
    assert held["explained_variance"] > 0.5  # it learned something on held-out text


def test_train_refuses_non_empty_out(trained, tmp_path, capsys):
    model, data, out = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(model)}, "data": {"dataset": str(data)}}))
    assert cli.main(["train-sae", str(cfg), "--hook", "blocks.1.hook_resid_post", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_corpus_is_deterministic_and_labelled(tmp_path):
    import json

    from saeray.assets.corpus import BUDGETS

    a = build(tmp_path / "a", n_files=3, max_docs=600)
    b = build(tmp_path / "b", n_files=3, max_docs=600)
    ta = [pq.read_table(f) for f in sorted(a.glob("*.parquet"))]
    tb = [pq.read_table(f) for f in sorted(b.glob("*.parquet"))]
    assert len(ta) == 3 and all(x.equals(y) for x, y in zip(ta, tb))
    rows = [r for t in ta for r in t.to_pylist()]
    assert set(BUDGETS) == {"code", "docstring", "documentation", "manual", "quotation"}
    # every kind in each half: the training half and the held-out half both hold all of them
    for half in (rows[:300], rows[300:]):
        assert {r["kind"] for r in half} == set(BUDGETS)
    meta = json.loads((a / "_corpus.json").read_text())
    assert meta["documents"] == len(rows)
    for kind in BUDGETS:
        docs = [r for r in rows if r["kind"] == kind]
        assert meta["by_kind"][kind] == {"documents": len(docs), "chars": sum(len(r["text"]) for r in docs)}
    assert all(meta["sources"][s]["version"] for s in ("python-docs", "manpages", "fortunes"))
    assert sum(len(d["text"]) for d in documents()) > 4_000_000  # the stdlib alone: ~1M+ tokens of text


def test_corpus_text_is_clean_of_markup():
    from saeray.assets.textsources import rst_to_text, troff_to_text

    man = troff_to_text('.\\" a comment\n.TH TCP 7\n.SH NAME\ntcp \\- TCP protocol\n.SH DESCRIPTION\n.B socket\n'
                        'is \\fIthe\\fP call\\(emsee\n.BR ip (7).\n.TS\ntab(:);\nlb l.\nA:B\n.TE\n')
    assert man == "Name\n\ntcp - TCP protocol\n\nDescription\n\nsocket\nis the call\u2014see\nip(7).\nA:B"
    doc = rst_to_text(".. _label:\n\nTitle\n=====\n\nUse :func:`len` and ``x`` with *care*.\n")
    assert doc == "\nTitle\n\nUse len and x with care."


def test_stats_warns_when_a_run_explains_far_less_than_the_training_report(trained, tmp_path, capsys):
    import shutil

    from saeray.analysis.stats import EV_MARGIN, reconstruction

    model, data, out = trained
    sae = tmp_path / "sae"
    shutil.copytree(out, sae)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(model), "dtype": "float32"},
                                   "saes": [{"name": "mine", "path": str(sae)}],
                                   "data": {"dataset": str(data)}, "tokens": {"context_size": 32},
                                   "output": {"dir": str(tmp_path / "run"), "reconstruction": True}}))
    assert cli.main(["run", str(cfg), "--local"]) == 0
    ev = reconstruction(tmp_path / "run").row(0, named=True)["explained_variance"]
    report_file = sae / "saeray_training.json"
    report = json.loads(report_file.read_text())

    def stats_err(report_ev: float) -> str:
        report["held_out"]["explained_variance"] = report_ev
        report_file.write_text(json.dumps(report))
        capsys.readouterr()
        assert cli.main(["stats", str(tmp_path / "run")]) == 0
        return capsys.readouterr().err

    assert stats_err(ev + EV_MARGIN / 2) == ""  # near the report: nothing to say
    err = stats_err(ev + EV_MARGIN + 0.05)
    assert "warning: SAE 'mine'" in err and f"{ev:.2f}" in err and f"{ev + EV_MARGIN + 0.05:.2f}" in err
    assert str(report_file) in err
    # weights changed since the run: the report no longer describes the SAE the run used
    cfg_json = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps(cfg_json, indent=1))  # same config, other bytes: another digest
    assert stats_err(ev + 0.5) == ""
    # a run without reconstruction partials: no comparison, no warning
    cfg.write_text(cfg.read_text().replace("reconstruction: true", "reconstruction: false")
                   .replace(str(tmp_path / "run"), str(tmp_path / "run2")))
    assert cli.main(["run", str(cfg), "--local"]) == 0
    capsys.readouterr()
    assert cli.main(["stats", str(tmp_path / "run2")]) == 0 and "warning" not in capsys.readouterr().err


def test_evaluate_by_label_equals_numpy_per_label():
    """Per-label figures (held-out kinds) against a direct numpy computation on the same tokens."""
    from saeray.tools.train import evaluate

    class Sae:  # a fixed linear encoder with ReLU and a linear decoder
        dtype = torch.float64

        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.w = torch.randn(6, 10, generator=g, dtype=torch.float64)
            self.d = torch.randn(10, 6, generator=g, dtype=torch.float64) / 4

        def encode(self, x):
            return torch.relu(x @ self.w - 1.0)

        def decode(self, z):
            return z @ self.d

    sae = Sae()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) * (1 + i) for i, n in enumerate((7, 9, 5))]
    labels = [np.array(["a", "b", "a", "c", "b", "a", "a"][:7], dtype=object), np.array(["c"] * 4 + ["b"] * 5, dtype=object),
              np.array(["a", "b", "c", "a", "b"], dtype=object)]
    got = evaluate(sae, iter(list(zip(xs, labels))))
    x, lab = torch.cat(xs).numpy(), np.concatenate(labels)
    for name in ("a", "b", "c"):
        xi = x[lab == name]
        zi = np.maximum(xi @ sae.w.numpy() - 1.0, 0)
        err = ((zi @ sae.d.numpy() - xi) ** 2).sum()
        f = got["by_label"][name]
        assert f["tokens"] == len(xi)
        assert f["explained_variance"] == pytest.approx(1 - err / ((xi - xi.mean(0)) ** 2).sum(), rel=1e-12)
        assert f["l0"] == pytest.approx((zi != 0).sum(1).mean())
        assert f["dead_fraction"] == pytest.approx(((zi != 0).sum(0) == 0).mean())
    assert got["tokens"] == len(x) == sum(f["tokens"] for f in got["by_label"].values())


def test_without_massive_drops_exactly_the_tokens_above_the_ratio():
    import numpy as np
    import torch

    from saeray.tools.train import without_massive

    rng = np.random.default_rng(3)
    x = rng.normal(size=(1001, 16)).astype(np.float32)
    x[[5, 500, 900]] *= 300  # massive-norm tokens
    norms = np.linalg.norm(x, axis=1)
    want = x[norms <= 10 * np.median(norms)]
    got = without_massive(torch.from_numpy(x).to(torch.bfloat16).float(), 10.0).numpy()
    assert len(want) == 998 and got.shape == want.shape
    np.testing.assert_allclose(got, torch.from_numpy(want).to(torch.bfloat16).float().numpy())
