"""saeray's rows and statistics against slow, obvious computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import base_config, make_model
from reference import assert_same_rows, read_rows, reference_rows

from saeray.analysis.stats import features
from saeray.engine import config, models
from saeray.executors import run


def _run(tiny, tmp_path: Path, model: str, saes: list[tuple[str, str]], **over) -> Path:
    out = tmp_path / "run"
    cfg = base_config(tiny[model], [{"name": n, "path": str(tiny[k])} for n, k in saes], tiny["data"], out, **over)
    run(config.from_dict(cfg), executor="local")
    return out


@pytest.mark.parametrize("model", ["llama", "gemma3"])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_rows_equal_reference(tiny, tmp_path, model, arch):
    # context_size 24 (from the SAE) splits long documents into several windows; 256-token
    # batches hold several windows of different lengths, padded on the right.
    out = _run(tiny, tmp_path, model, [(arch, f"sae_{arch}")])
    want = reference_rows(tiny[model], tiny[f"sae_{arch}"], tiny["docs"], doc_ids=tiny["doc_ids"], context_size=24)
    assert_same_rows(read_rows(out, arch, "all"), want)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_compiled_rows_equal_reference(tiny, tmp_path, model):
    """model.compile: true (inductor, as on a GPU by default) gives the slow one-window loop's rows too."""
    out = _run(tiny, tmp_path, model, [("jumprelu", "sae_jumprelu")], model__compile=True)
    want = reference_rows(tiny[model], tiny["sae_jumprelu"], tiny["docs"], doc_ids=tiny["doc_ids"], context_size=24)
    assert_same_rows(read_rows(out, "jumprelu", "all"), want)


def test_several_saes_one_pass_and_last_position(tiny, tmp_path):
    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard"), ("b", "sae_topk")], positions={"mode": "last"})
    got = read_rows(out)
    assert set(got["group"].unique()) == {"last"}
    for name, key in [("a", "sae_standard"), ("b", "sae_topk")]:
        want = reference_rows(tiny["llama"], tiny[key], tiny["docs"], doc_ids=tiny["doc_ids"], context_size=24, mode="last")
        assert_same_rows(got.filter(pl.col("sae") == name), want)
    # one position per document that has any token
    assert got.group_by("sae").agg(pl.col("doc_id").n_unique())["doc_id"].max() <= len(tiny["docs"])


def test_row_groups_sorted(tiny, tmp_path):
    """Each row group of an activations file is sorted by (sae, group, doc_id, pos, feature): small
    batches and blocks put windows of many documents, out of order, into each forward pass."""
    import pyarrow.parquet as pq

    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard"), ("b", "sae_topk")], tokens={"batch_tokens": 64})
    files = sorted((out / "activations").rglob("*.parquet"))
    n_groups = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            got = pl.from_arrow(pf.read_row_group(i))
            assert got.height and got.equals(got.sort(["sae", "group", "doc_id", "pos", "feature"])), (f, i)
            n_groups += 1
    assert n_groups >= 2 and len(read_rows(out)) == sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def test_marker_groups(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    start_id = tok.convert_tokens_to_ids("<|im_start|>")
    marker = tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    assert marker[0] == start_id and len(marker) >= 2
    # anchored at the marker's last token: offset -(len-1) is the special <|im_start|> itself
    groups = {"header": {"marker": "<|im_start|>assistant", "offset": 0},
              "start": {"marker": "<|im_start|>assistant", "offset": 1 - len(marker)},
              "after": {"marker": "<|im_start|>assistant", "offset": 1}}
    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")], positions={"mode": "markers", "groups": groups})
    got = read_rows(out)
    docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet")).sort("doc_id")
    expected = {g: set() for g in groups}
    for d, ids in zip(docs["doc_id"].to_list(), docs["token_ids"].to_list()):
        for p in range(len(ids) - len(marker) + 1):
            if ids[p:p + len(marker)] == marker:
                a = p + len(marker) - 1
                for g, spec in groups.items():
                    if 0 <= a + spec["offset"] < len(ids):
                        expected[g].add((d, a + spec["offset"]))
    assert expected["start"], "the corpus should contain chat markers"
    for g in groups:
        assert set(got.filter(pl.col("group") == g).select("doc_id", "pos").unique().iter_rows()) <= expected[g]
    # the special <|im_start|> token is kept because a marker group asks for it
    tokens = docs.explode("token_ids").with_columns(pl.int_range(pl.len()).over("doc_id").cast(pl.Int32).alias("pos"))
    start_rows = got.filter(pl.col("group") == "start").join(tokens, on=["doc_id", "pos"])
    assert start_rows.height > 0 and (start_rows["token_ids"] == start_id).all()
    header_rows = got.filter(pl.col("group") == "header").join(tokens, on=["doc_id", "pos"])
    assert header_rows.height > 0 and (header_rows["token_ids"] == marker[-1]).all()


def test_docs_table_and_special_tokens_excluded(tiny, tmp_path):
    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")], data__keep_columns=["label", "kind"])
    docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert docs["doc_id"].to_list() == tiny["doc_ids"]
    assert docs.schema["label"] == pl.Boolean and docs.schema["kind"] == pl.String
    assert docs["label"].to_list() == [i % 3 == 0 for i in range(len(tiny["docs"]))]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    special = set(tok.all_special_ids)
    rows = read_rows(out).join(
        docs.select("doc_id", "token_ids").explode("token_ids")
        .with_columns(pl.int_range(pl.len()).over("doc_id").cast(pl.Int32).alias("pos")), on=["doc_id", "pos"])
    assert rows.height == read_rows(out).height  # every row points at a real token
    assert not rows["token_ids"].is_in(list(special)).any()


def _numpy_stats(rows: pl.DataFrame, docs: pl.DataFrame, special: set[int], d_sae: int) -> dict[str, np.ndarray]:
    n_tok = sum(sum(1 for t in ids if t not in special) for ids in docs["token_ids"])
    dense_sum = np.zeros(d_sae)
    dense_sq = np.zeros(d_sae)
    n_active = np.zeros(d_sae, dtype=np.int64)
    mx = np.full(d_sae, -np.inf)
    f = rows["feature"].to_numpy()
    v = rows["value"].to_numpy().astype(np.float64)
    np.add.at(dense_sum, f, v)
    np.add.at(dense_sq, f, v * v)
    np.add.at(n_active, f, 1)
    np.maximum.at(mx, f, v)
    mean = dense_sum / n_tok
    std = np.sqrt(dense_sq / n_tok - mean ** 2)
    n_docs = rows.group_by("feature").agg(pl.col("doc_id").n_unique()).sort("feature")
    nd = np.zeros(d_sae, dtype=np.int64)
    nd[n_docs["feature"].to_numpy()] = n_docs["doc_id"].to_numpy()
    return {"n_tokens": np.full(d_sae, n_tok), "n_active": n_active, "mean": mean, "std": std,
            "max": np.where(n_active > 0, mx, np.nan), "n_docs_active": nd}


@pytest.mark.parametrize("shards", [None, 7])
def test_stats_equal_numpy(tiny, tmp_path, shards):
    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")], data__shards=shards)
    rows, docs = read_rows(out), pl.read_parquet(str(out / "docs" / "**" / "*.parquet"))
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(tiny["llama"]).all_special_ids)
    want = _numpy_stats(rows, docs, special, 96)
    got = features(out).collect().sort("feature")
    for col in ("n_tokens", "n_active", "n_docs_active"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col], err_msg=col)
    for col in ("mean", "std"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col], rtol=1e-9, atol=1e-12, err_msg=col)
    np.testing.assert_allclose(got["max"].fill_null(np.nan).to_numpy(), want["max"], rtol=1e-7)
    np.testing.assert_allclose(got["density"].to_numpy(), want["n_active"] / want["n_tokens"])
    # the max's location holds the max
    loc = got.drop_nulls("max").join(rows, left_on=["feature", "max_doc_id", "max_pos"],
                                     right_on=["feature", "doc_id", "pos"])
    assert loc.height == got.drop_nulls("max").height
    np.testing.assert_array_equal(loc["max"].to_numpy(), loc["value"].to_numpy())


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_hook_points_add_up(tiny, model):
    """resid_pre + attn_out + mlp_out = resid_post, and resid_mid = resid_pre + attn_out."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny[model], dtype=torch.float32).eval()
    sites = [models.parse_hook(f"blocks.2.{k}", 4) for k in models.HOOK_KINDS]
    ids = torch.randint(5, 300, (2, 11))
    h = models.run_to_hooks(m, sites, ids, torch.ones_like(ids))
    g = lambda k: h[f"blocks.2.{k}"]  # noqa: E731
    torch.testing.assert_close(g("hook_resid_pre") + g("hook_attn_out") + g("hook_mlp_out"), g("hook_resid_post"))
    torch.testing.assert_close(g("hook_resid_pre") + g("hook_attn_out"), g("hook_resid_mid"))
    full = m(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(g("hook_resid_pre"), full[2])
    torch.testing.assert_close(g("hook_resid_post"), full[3])


def test_forward_stops_after_deepest_hook(tiny):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    ran = []
    for i, layer in enumerate(m.model.layers):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    m.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    ids = torch.randint(5, 300, (1, 5))
    models.run_to_hooks(m, [models.parse_hook("blocks.1.hook_mlp_out", 4)], ids, torch.ones_like(ids))
    assert ran == [0]  # layer 1 stopped inside (at its MLP), nothing after it ran


def test_max_tokens_budget(tiny, tmp_path):
    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")], data__max_tokens=500, data__shards=4)
    docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert docs["n_tokens"].sum() == 500
    assert docs["doc_id"].to_list() == tiny["doc_ids"][:docs.height]
    out2 = tmp_path / "b"
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], out2,
                      data__max_tokens=500)
    run(config.from_dict(cfg), executor="local")
    assert_same_rows(read_rows(out2), read_rows(out), atol=1e-5)


def test_stats_only_mode_matches_full_run(tiny, tmp_path):
    full = _run(tiny, tmp_path / "full", "llama", [("a", "sae_standard")], data__shards=4)
    lean = _run(tiny, tmp_path / "lean", "llama", [("a", "sae_standard")], data__shards=4,
                output={"dir": str(tmp_path / "lean" / "run"), "activations": False})
    assert not any((lean / "activations").iterdir())
    assert len(list((lean / "completions").iterdir())) == 4
    a, b = features(full).collect(), features(lean).collect()
    assert a["n_active"].to_list() == b["n_active"].to_list()
    np.testing.assert_allclose(a["mean"].to_numpy(), b["mean"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(a["std"].to_numpy(), b["std"].to_numpy(), rtol=1e-12)


def test_reconstruction_partials_equal_a_direct_computation(tiny, tmp_path):
    from sae_lens import SAE

    from saeray.analysis.stats import reconstruction

    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")], data__shards=4,
               output={"dir": str(tmp_path / "run"), "reconstruction": True})
    got = reconstruction(out).row(0, named=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    sae = SAE.load_from_disk(tiny["sae_standard"])
    xs = []
    with torch.no_grad():
        for text in tiny["docs"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), 23):
                win = ids[s:s + 23]
                h = model(torch.tensor([[tok.bos_token_id] + win]), output_hidden_states=True).hidden_states[2][0, 1:]
                xs.append(h[[j for j, t in enumerate(win) if t not in tok.all_special_ids]])
        x = torch.cat(xs)
        z = sae.encode(x)
        x_hat = sae.decode(z)
    x, x_hat = x.double().numpy(), x_hat.double().numpy()
    sse = ((x - x_hat) ** 2).sum()
    assert got["n_tokens"] == len(x)
    assert got["mse"] == pytest.approx(sse / len(x), rel=1e-4)
    assert got["explained_variance"] == pytest.approx(1 - sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    assert got["l0"] == pytest.approx(float((z != 0).sum()) / len(x), rel=1e-3)
    assert sum(got["sq_err_hist"]) == len(x)


def test_docs_record_counted_positions_per_group(tiny, tmp_path):
    from transformers import AutoTokenizer

    from saeray.analysis.significance import doc_positions

    out = _run(tiny, tmp_path, "llama", [("a", "sae_standard")])
    special = set(AutoTokenizer.from_pretrained(tiny["llama"]).all_special_ids)
    docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet")).sort("doc_id")
    got = {d: (n, last) for _, d, n, last in doc_positions(out).collect().iter_rows()}
    for d, ids in zip(docs["doc_id"].to_list(), docs["token_ids"].to_list()):
        counted = [p for p, t in enumerate(ids) if t not in special]
        assert got.get(d) == ((len(counted), counted[-1]) if counted else None)
    rows = read_rows(out).group_by("doc_id").agg(pl.col("pos").max())
    assert all(p <= got[d][1] for d, p in rows.iter_rows())


def test_attention_auto_keeps_gemma2_soft_capping(tmp_path):
    """model.attn_implementation auto on Gemma 2 runs eager attention (sdpa would drop the logit soft-capping):
    activations equal eager's exactly, differ from the same model without capping, and sdpa is refused."""
    import json

    from saeray.engine.config import ModelConfig

    path = make_model(tmp_path / "g2", "gemma2", n_layers=2)
    model, _ = models.load_model(ModelConfig(name=str(path), dtype="float32"), torch.device("cpu"))
    with torch.no_grad():  # large query/key weights: logits of hundreds, where a cap of 50 changes attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(60)
            layer.self_attn.k_proj.weight.mul_(60)
    model.save_pretrained(path)
    capped = json.loads((path / "config.json").read_text())
    (tmp_path / "nocap").mkdir()
    for f in path.iterdir():
        (tmp_path / "nocap" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "nocap" / "config.json").write_text(json.dumps({**capped, "attn_logit_softcapping": None}))

    ids = torch.randint(3, 300, (2, 12))
    site = [models.parse_hook("blocks.1.hook_resid_post", 2)]

    def hidden(where: str, attn: str) -> torch.Tensor:
        m, _ = models.load_model(ModelConfig(name=where, dtype="float32", attn_implementation=attn), torch.device("cpu"))
        return models.run_to_hooks(m, site, ids, torch.ones_like(ids))[site[0].name]

    auto, eager = hidden(str(path), "auto"), hidden(str(path), "eager")
    assert torch.equal(auto, eager)
    uncapped = hidden(str(tmp_path / "nocap"), "eager")
    assert (auto - uncapped).abs().max() > 1e-2  # the cap matters for these activations
    with pytest.raises(models.ModelError, match="attn_implementation 'sdpa'"):
        hidden(str(path), "sdpa")
