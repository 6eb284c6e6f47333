"""`saeray export neuronpedia` against SAEDashboard's own SaeVisRunner + NeuronpediaConverter (PyPI
`sae-dashboard`) on the same prompts, with a TransformerLens copy of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("sae_dashboard")
pytest.importorskip("transformer_lens")

from helpers import base_config, corpus, make_model, make_sae  # noqa: E402

from saeray.engine import config  # noqa: E402
from saeray.executors import run  # noqa: E402
from saeray.report.export import neuronpedia  # noqa: E402

L = 24  # tokens per prompt, BOS included
HOOK = "blocks.1.hook_resid_post"
FEATURES = list(range(96))  # the whole SAE


def _tl_config(*args):
    """tests/engine/test_transformerlens.py's TransformerLens config (that folder is on sys.path only when
    pytest collects a test in it)."""
    import sys
    from pathlib import Path

    engine_tests = str(Path(__file__).resolve().parents[1] / "engine")
    if engine_tests not in sys.path:
        sys.path.insert(0, engine_tests)
    from test_transformerlens import _tl_config as tl_config

    return tl_config(*args)


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> dict:
    import transformer_lens.loading_from_pretrained as loading
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    model_dir = make_model(root / "tinymodel", "llama", n_layers=4, seed=3)
    sae_dir = make_sae(root / "sae", "standard", 64, HOOK, seed=8)
    sae = SAE.load_from_disk(str(sae_dir))
    with torch.no_grad():  # unit-norm decoder rows: SAEDashboard's folding of ||W_dec|| into the acts is a no-op
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    sae.save_model(str(sae_dir))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = _tl_config(model_dir, hf, "llama")
    state = loading.get_pretrained_state_dict(str(model_dir), cfg, hf_model=hf, dtype=torch.float32)
    tl = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    tl.eval()
    rows = []
    for text in corpus(400, seed=5):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= L - 1 and [tok.bos_token_id] + ids[:L - 1] not in rows:
            rows.append([tok.bos_token_id] + ids[:L - 1])
    tokens = torch.tensor(rows[:96])
    data = root / "data"
    data.mkdir()
    pq.write_table(pa.table({"ids": pa.array(tokens.tolist(), pa.list_(pa.int32()))}), data / "part-0.parquet")
    raw = base_config(model_dir, [{"name": "s", "path": str(sae_dir)}], data, root / "run",
                      tokens={"context_size": L, "batch_tokens": 256},
                      output={"dir": str(root / "run"), "activations": False, "docs": "examples", "context_radius": L})
    raw["data"] = {"dataset": str(data), "token_column": "ids"}
    run(config.from_dict(raw), executor="local")
    ours = neuronpedia(root / "run", root / "np", features_per_batch=32, features=FEATURES)

    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import SaeVisLayoutConfig
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    layout = SaeVisLayoutConfig(columns=[Column(
        SequencesConfig(buffer=None, compute_buffer=True, n_quantiles=5, top_acts_group_size=20, quantile_group_size=5),
        ActsHistogramConfig(), LogitsHistogramConfig(), LogitsTableConfig(), FeatureTablesConfig(n_rows=3))])
    vcfg = SaeVisConfig(hook_point=HOOK, features=FEATURES, minibatch_size_features=16, minibatch_size_tokens=32,
                        device="cpu", dtype="float32", feature_centric_layout=layout, cache_dir=None,
                        # the runner masks BOS, EOS and PAD; saeray counts no special token (tokens.exclude_special),
                        # and these prompts hold <|im_start|>: mask every special token on both sides
                        ignore_tokens=set(tok.all_special_ids))
    data_sd = SaeVisRunner(vcfg).run(encoder=sae, model=tl, tokens=tokens)
    ncfg = NeuronpediaRunnerConfig(sae_set="s", sae_path=str(sae_dir), outputs_dir=str(root / "sd"), model_id="tiny",
                                   layer=1, n_prompts_total=len(tokens), n_tokens_in_prompt=L)
    from types import SimpleNamespace

    from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner

    vocab = NeuronpediaRunner.get_vocab_dict(SimpleNamespace(model=tl))  # the runner's own vocabulary strings
    sd = json.loads(NeuronpediaConverter.convert_to_np_json(tl, data_sd, ncfg, vocab))
    mine = {f["feature_index"]: f for p in ours for f in json.loads(p.read_text())["features"]}
    from saeray.analysis.stats import features

    counted = int(features(root / "run").collect()["n_tokens"][0])
    return {"sd": sd, "mine": mine, "files": ours, "tokens": tokens, "out": root / "np", "counted": counted,
            "run": root / "run", "tok": tok}


def _kind(v):
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def test_same_keys_and_types(both):
    sd, files = both["sd"], both["files"]
    top = json.loads(files[0].read_text())
    assert set(top) == set(sd) and [p.name for p in files] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    for f in sd["features"]:
        m = both["mine"][f["feature_index"]]
        assert set(m) == set(f)
        assert {k: _kind(v) for k, v in m.items()} == {k: _kind(v) for k, v in f.items()}
        for a, b in zip(m["activations"], f["activations"]):
            assert set(a) == set(b) and {k: _kind(v) for k, v in a.items()} == {k: _kind(v) for k, v in b.items()}
    assert (both["out"] / "skipped_indexes.json").is_file() and (both["out"] / "run_settings.json").is_file()


def test_frac_nonzero_and_top_examples_equal_saedashboard(both):
    n_prompts = len(both["tokens"])
    compared = alive = 0
    for f in both["sd"]["features"]:
        m = both["mine"][f["feature_index"]]
        # SAEDashboard: count(act > 0) over all n_prompts x L positions (masked ones counted in the denominator),
        # as a percentage with 3 decimals; saeray: exact, over its counted tokens (no BOS, no special token)
        assert both["counted"] < n_prompts * (L - 1)  # some prompts hold special tokens
        assert abs(m["frac_nonzero"] * both["counted"] / (n_prompts * L) - f["frac_nonzero"]) <= 5e-6 + 1e-9
        if m["frac_nonzero"] == 0:
            continue
        alive += 1
        # SAEDashboard's top 20 positions, one per prompt (its first = the prompt's maximum) vs saeray's documents
        seen, theirs = set(), []
        for e in f["activations"][:20]:
            if max(e["values"]) <= 0 or tuple(e["tokens"]) in seen:
                continue
            seen.add(tuple(e["tokens"]))
            theirs.append(e)
        ours = [e for e in m["activations"] if e["bin_min"] == -1][:len(theirs)]
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):  # the same maxima in the same order (sae-dashboard 0.8.0 rounds to 3 decimals)
            assert abs(max(a["values"]) - max(b["values"])) <= 6e-4
        # documents that tie on the maximum (the tiny model's first positions repeat across prompts) are ordered by
        # doc_id here and arbitrarily there: compare the examples as sets per tie group (the last one may be cut)
        groups: dict[float, tuple[list, list]] = {}
        for a, b in zip(ours, theirs):
            key = round(max(b["values"]), 3)
            groups.setdefault(key, ([], []))
            groups[key][0].append((tuple(a["tokens"]), a["qualifying_token_index"], a["values"]))
            groups[key][1].append((tuple(b["tokens"]), b["qualifying_token_index"], b["values"]))
        twentieth = f["activations"][19]
        cut = round(twentieth["values"][twentieth["qualifying_token_index"]], 3)  # SAEDashboard's 20th position
        for key, (x, y) in groups.items():
            if key != cut:
                x, y = sorted(x, key=lambda t: t[:2]), sorted(y, key=lambda t: t[:2])
                assert [t[:2] for t in x] == [t[:2] for t in y], key  # the same prompts, at the same position
                assert all(np.allclose(a[2], b[2], atol=6e-4) for a, b in zip(x, y))  # and the same values
                compared += len(x)
    assert alive >= 15 and compared >= 150, (alive, compared)
    assert n_prompts == 96


def test_delphi_latent_dataset_yields_the_runs_examples(both, tmp_path):
    """delphi's own LatentDataset (PyPI eai-delphi) loads the export and yields, per latent, exactly the
    examples saeray's `top` shows: its top documents and interval samples, tokens and activations."""
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    from saeray.analysis.stats import features
    from saeray.analysis.top import interval_examples, top_examples
    from saeray.report.delphi import delphi

    run, tok = both["run"], both["tok"]
    files = delphi(run, tmp_path / "d", n_splits=3)
    assert [p.name for p in files] == ["0_31.safetensors", "32_63.safetensors", "64_95.safetensors"]
    stats = features(run).collect()
    alive = stats.filter(pl.col("n_active") > 0)["feature"].to_list()
    latents = alive[:3] + alive[-3:]  # in the first and the last split
    ctx = 2 * L + 1
    ds = LatentDataset(tmp_path / "d" / "latents", SamplerConfig(n_examples_train=1, n_examples_test=1, n_quantiles=1),
                       ConstructorConfig(min_examples=1, n_non_activating=0, example_ctx_len=ctx),
                       tokenizer=tok, modules=[HOOK], latents={HOOK: torch.tensor(latents)})
    records = {r.latent.latent_index: r for r in ds}
    assert sorted(records) == sorted(latents)
    for f in latents:
        want = {}
        for frame in (top_examples(run, [f], k=20, window=(L, L)), interval_examples(run, [f], per_bin=5, window=(L, L))):
            for e in frame.iter_rows(named=True):
                ids = list(e["token_ids"]) + [tok.pad_token_id] * (ctx - len(e["token_ids"]))
                acts = list(e["acts"]) + [0.0] * (ctx - len(e["acts"]))
                want[tuple(ids)] = np.float16(acts).astype(np.float32)
        got = {tuple(x.tokens.tolist()): x.activations.float().numpy() for x in records[f].examples}
        assert got.keys() == want.keys() and len(got) >= 2
        for key, acts in got.items():
            np.testing.assert_array_equal(acts, np.where(np.abs(want[key]) > 1e-5, want[key], 0.0))


def test_export_commands(both, tmp_path):
    import subprocess
    import sys

    for fmt, first in (("neuronpedia", "batch-0.json"), ("delphi", "latents")):
        done = subprocess.run([sys.executable, "-m", "saeray.cli", "export", fmt, str(both["run"]), "--out",
                               str(tmp_path / fmt), "--features-per-batch", "64", "--splits", "2"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / fmt / first).exists() and "wrote" in done.stdout
        # the folder named is the one that holds the files (delphi's: latents/<hookpoint>/ below --out)
        where = Path(done.stdout.split(" files to ", 1)[1].split(" (", 1)[0])
        assert where.is_dir() and any(where.glob("*.json")), done.stdout
        if fmt == "delphi":
            assert where.parent.parent == tmp_path / fmt
        # progress on stderr: the last step always, with elapsed time and an estimate of the rest
        steps = "2/2 batch files" if fmt == "neuronpedia" else "1/1 feature ranges read"
        assert f"{fmt}: {steps}" in done.stderr and "| ETA 0s" in done.stderr, done.stderr[-2000:]
    # 96 features in ceil(96 / 64) = 2 batches of 48 (np.array_split, as NeuronpediaRunner cuts them)
    assert len(json.loads((tmp_path / "neuronpedia" / "batch-1.json").read_text())["features"]) == 48


def test_record_size_against_saedashboard(both):
    """A feature's record against SAEDashboard's for the same features and settings (the same 96 prompts, 20 top
    examples, 5 x 5 interval examples; here contexts are the whole 24-token prompts on both sides), both written as
    compact JSON: per context token of an example (token string, activation and its share of the example's keys),
    and the rest of a record (logit tables and histograms, statistics). saeray writes activations to 5 decimals,
    sae-dashboard 0.8.0 to 3, so its tokens are larger; printed with `pytest -s`."""
    import orjson

    sizes = {"ours": [0, 0, 0], "theirs": [0, 0, 0]}  # example bytes, context tokens, the rest's bytes
    for f in both["sd"]["features"]:
        for side, rec in (("ours", both["mine"][f["feature_index"]]), ("theirs", f)):
            sizes[side][0] += sum(len(orjson.dumps(e)) for e in rec["activations"])
            sizes[side][1] += sum(len(e["tokens"]) for e in rec["activations"])
            sizes[side][2] += len(orjson.dumps({k: v for k, v in rec.items() if k != "activations"}))
    n = len(both["sd"]["features"])
    per_token = {side: b / t for side, (b, t, _) in sizes.items()}
    rest = {side: r / n for side, (_, _, r) in sizes.items()}
    print(f"\nbytes per context token: saeray {per_token['ours']:.1f}, SAEDashboard {per_token['theirs']:.1f}; "
          f"the rest of a record: saeray {rest['ours']:.0f} B, SAEDashboard {rest['theirs']:.0f} B")
    assert per_token["theirs"] < per_token["ours"] <= 1.35 * per_token["theirs"]
    assert rest["ours"] <= 1.15 * rest["theirs"]


@pytest.mark.slow
def test_smaller_records_by_option(both, tmp_path):
    """The export's size options: fewer top documents and interval examples, shorter contexts (each example's
    tokens within `context` of its maximum, the same tokens and values as the full record's there) and gzip (the
    same JSON); a context wider than the run kept is refused, and delphi refuses neuronpedia's options."""
    import gzip
    import subprocess
    import sys

    feats = list(range(96))
    small = neuronpedia(both["run"], tmp_path / "small", features=feats, top=3, n_intervals=2, per_interval=1,
                        context=4, features_per_batch=32)
    packed = neuronpedia(both["run"], tmp_path / "gz", features=feats, top=3, n_intervals=2, per_interval=1,
                         context=4, features_per_batch=32, compress=True)
    assert [p.name for p in packed] == [p.name + ".gz" for p in small]
    assert all(gzip.decompress(g.read_bytes()) == p.read_bytes() for g, p in zip(packed, small))
    assert sum(p.stat().st_size for p in packed) < sum(p.stat().st_size for p in small) / 2
    checked = 0
    for f in (f for p in small for f in json.loads(p.read_text())["features"]):
        full = both["mine"][f["feature_index"]]["activations"]
        tops = [e for e in f["activations"] if e["bin_min"] == -1]
        assert len(tops) == min(3, len([e for e in full if e["bin_min"] == -1]))
        assert len(f["activations"]) - len(tops) <= 2
        for e, ref in zip(tops, full):
            q, rq = e["qualifying_token_index"], ref["qualifying_token_index"]
            assert len(e["tokens"]) <= 9 and q <= 4
            assert e["tokens"] == ref["tokens"][rq - q:rq - q + len(e["tokens"])]
            assert e["values"] == ref["values"][rq - q:rq - q + len(e["values"])]
            checked += 1
    assert checked >= 20
    with pytest.raises(ValueError, match="context 99"):
        neuronpedia(both["run"], tmp_path / "wide", features=[0], context=99)
    done = subprocess.run([sys.executable, "-m", "saeray.cli", "export", "delphi", str(both["run"]), "--out",
                           str(tmp_path / "d"), "--gzip"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--gzip: options of `export neuronpedia`" in done.stderr


def test_ranked_equals_stable_argsort_with_ties():
    """export.ranked (one batched torch.topk) gives, per row, the first k of np.argsort(-row, kind="stable") and
    the first k of that order reversed, on rows full of ties: at the cut, inside the k, between the maxima of
    blocks, and 0.0 against -0.0; with blocks that divide the row and blocks that leave columns over."""
    from saeray.report.logit_fields import ranked

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (64, 300), generator=gen).float() / 2  # 9 distinct values: ties everywhere
    x[:8] = torch.randn(8, 300, generator=gen)  # rows without ties
    x[8] = 0.0
    x[9, ::2] = -0.0
    x[10, :20] = 7.0  # more of the largest value than k
    x[11, -20:] = -7.0
    x[12, 5::8] = 9.0  # one per block of 8: blocks whose maxima tie
    for k, block in [(k, block) for k in (1, 3, 10, 299, 300, 400) for block in (256, 8, 7)]:
        top, bottom = ranked(x, k, block=block), ranked(x, k, largest=False, block=block)
        for r, row in enumerate(x.numpy()):
            order = np.argsort(-row, kind="stable")
            assert top[r].tolist() == order[:k].tolist(), (k, block, r)
            assert bottom[r].tolist() == order[::-1][:k].tolist(), (k, block, r)


def test_rounded_activations_equal_pythons_round():
    """The batch files' activations are rounded for all examples at once with numpy; for float32 values that is
    Python's round(value, 5) (value * 1e5 is exact in float64), halves and every magnitude included."""
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-7, 5, 100_000),
                        np.arange(-4096, 4096) / 64, np.arange(-4096, 4096) / 2 ** 17]).astype(np.float32)
    assert v.astype(np.float64).round(5).tolist() == [round(float(a), 5) for a in v]


def test_file_vocab_equals_the_tokenizers_librarys(tmp_path):
    """The batch files' token strings come from tokenizer.json read as JSON: per model type (BPE as the tiny model
    writes it, Unigram, WordLevel, WordPiece), with added tokens, the vocabulary equals what the `tokenizers`
    library's get_vocab gives for the same file; another model type is refused (None: the tokenizer is loaded)."""
    from tokenizers import AddedToken, Tokenizer, models

    from saeray.assets.tiny import make_tokenizer
    from saeray.report.logit_fields import file_vocab

    make_tokenizer(tmp_path / "bpe")
    files = [tmp_path / "bpe" / "tokenizer.json"]
    pieces = ["<unk>", "a", "b", "ab", "▁the", "Ġx"]
    for name, model in [("unigram", models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], 0)),
                        ("wordlevel", models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>")),
                        ("wordpiece", models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))]:
        tok = Tokenizer(model)
        tok.add_special_tokens([AddedToken("<|special|>", special=True)])
        tok.add_tokens(["newword"])
        files.append(tmp_path / f"{name}.json")
        tok.save(str(files[-1]))
    for path in files:
        assert file_vocab(path) == Tokenizer.from_file(str(path)).get_vocab(), path.name
    assert len(file_vocab(files[1])) == len(pieces) + 2
    odd = json.loads(files[1].read_text())
    odd["model"]["type"] = "SomethingNew"
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    assert file_vocab(tmp_path / "odd.json") is None


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_decoder_read_from_the_weights_file_equals_sae_lens(tmp_path, arch):
    """The export reads W_dec from a disk SAE's weights file without sae-lens: the same tensor sae-lens loads."""
    from saeray.engine.config import SAEConfig
    from saeray.engine.saes import decoder, load

    path = make_sae(tmp_path / arch, arch, 64, HOOK, seed=4)
    cfg = SAEConfig(name="s", path=str(path))
    got = decoder(cfg)
    assert got.dtype == torch.float32 and got.shape == (96, 64)
    assert torch.equal(got, load(cfg, torch.device("cpu")).W_dec.detach().float())


def test_logits_in_a_reused_buffer_equal_a_new_product():
    """The logit products of a worker reuse one buffer: each call's result equals the plain product, whatever the
    calls before it left there (more rows, fewer rows)."""
    from saeray.report.logit_fields import _logits

    gen = torch.Generator().manual_seed(1)
    w_u = torch.randn(1000, 16, generator=gen)
    for rows in (7, 3, 12, 1):
        w = torch.randn(rows, 16, generator=gen)
        assert torch.equal(_logits(w, w_u), w @ w_u.T)
