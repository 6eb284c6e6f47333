"""Vision-language models (workflow 1): image/text positions, the VLM on text, and the transfer classes.

A tiny random PaliGemma-style model (SigLIP tower, Gemma 2 text model, 4 image tokens per image)
runs over generated images; saeray's rows must equal a slow reference (the full VLM forward,
one document at a time, as its processor prepares it), and the transfer classification must
equal a numpy computation of the rules from the raw activation rows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import base_config, canonical_doc_ids, corpus, make_sae
from reference import assert_same_rows, read_rows

from saeray import cli
from saeray.assets.tiny import language_model_of, make_vlm, write_image_dataset
from saeray.engine import config, models
from saeray.executors import run

MISSING = (3, 7)  # rows without an image: they run text-only through the VLM
SAES = {"res1": ("standard", "blocks.1.hook_resid_post"), "pre2": ("topk", "blocks.2.hook_resid_pre")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vlm")
    texts = corpus(20, seed=3, max_words=12)
    out = {"root": root, "texts": texts, "vlm": make_vlm(root / "vlm")}
    out["lm"] = language_model_of(out["vlm"], root / "lm")
    out["lm_noisy"] = language_model_of(out["vlm"], root / "lm_noisy", noise=0.5, seed=1)
    out["data"] = write_image_dataset(root / "data", texts, n_files=2, missing=MISSING)
    out["saes"] = [{"name": n, "path": str(make_sae(root / n, arch, 64, hook, seed=i))}
                   for i, (n, (arch, hook)) in enumerate(SAES.items())]
    return out


def _run(parts: dict, name: str, model: str, **over) -> Path:
    out = parts["root"] / name
    if not (out / "manifest.json").exists():
        cfg = base_config(parts[model], parts["saes"], parts["data"], out, positions={"mode": "modality"},
                          tokens={"batch_tokens": 256, "context_size": 64}, **over)
        run(config.from_dict(cfg), executor="local")
    return out


def _images(parts: dict) -> list:
    from PIL import Image

    table = pl.read_parquet(str(parts["data"] / "*.parquet"))
    return [None if v is None else Image.open(io.BytesIO(v["bytes"])).convert("RGB") for v in table["image"]]


def reference_rows(parts: dict, sae_name: str) -> pl.DataFrame:
    """One document at a time: the processor's inputs (image docs) or BOS + text, the full forward with
    output_hidden_states, sae.encode, nonzeros at image positions and counted text positions."""
    from sae_lens import SAE
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(parts["vlm"])
    model = AutoModelForImageTextToText.from_pretrained(parts["vlm"], dtype=torch.float32).eval()
    sae = SAE.load_from_disk(parts["root"] / sae_name)
    layer, kind = int(SAES[sae_name][1].split(".")[1]), SAES[sae_name][1].split(".")[2]
    index = layer + (kind == "hook_resid_post")
    tok = processor.tokenizer
    special, image_id = set(tok.all_special_ids), model.config.image_token_id
    rows = []
    with torch.no_grad():
        for doc_id, text, image in zip(canonical_doc_ids(parts["data"]), parts["texts"], _images(parts)):
            if image is None:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                inputs = {"input_ids": torch.tensor([[tok.bos_token_id] + ids])}
                shift = 1
            else:
                inputs = dict(processor(images=image, text="<image>" + text, return_tensors="pt"))
                inputs.pop("labels")
                ids, shift = inputs["input_ids"][0].tolist(), 0
            hs = model(**inputs, output_hidden_states=True).hidden_states[index][0]
            acts = sae.encode(hs)
            for pos, t in enumerate(ids):
                group = "image" if t == image_id else "text" if t not in special else None
                if group is None:
                    continue
                a = acts[pos + shift]
                rows += [(group, doc_id, pos, f, float(a[f])) for f in torch.nonzero(a).flatten().tolist()]
    return pl.DataFrame(rows, schema={"group": pl.String, "doc_id": pl.Int64, "pos": pl.Int32, "feature": pl.Int32,
                                      "value": pl.Float32}, orient="row")


@pytest.mark.parametrize("sae", list(SAES))
def test_image_and_text_rows_equal_reference(parts, sae):
    out = _run(parts, "vlm_image", "vlm", data__image_column="image")
    got = read_rows(out, sae)
    want = reference_rows(parts, sae)
    assert set(got["group"].unique()) == {"image", "text"}
    for g in ("image", "text"):
        assert_same_rows(got.filter(pl.col("group") == g), want.filter(pl.col("group") == g))


def test_image_positions_are_the_image_tokens(parts):
    from transformers import AutoProcessor

    out = _run(parts, "vlm_image", "vlm", data__image_column="image")
    processor = AutoProcessor.from_pretrained(parts["vlm"])
    image_id = processor.image_token_id
    docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet")).sort("doc_id")
    rows = read_rows(out, group="image")
    for (doc_id, ids, positions), text, image in zip(docs.select("doc_id", "token_ids", "positions").iter_rows(),
                                                     parts["texts"], _images(parts)):
        where = [p for p, t in enumerate(ids) if t == image_id]
        groups = {p["group"]: p for p in positions}
        if image is None:
            assert where == [] and "image" not in groups
            continue
        # token_ids are exactly the processor's sequence: 4 image tokens, BOS, text, newline
        assert ids == processor(images=image, text="<image>" + text)["input_ids"][0]
        assert where == [0, 1, 2, 3] and groups["image"]["n"] == 4 and groups["image"]["last"] == 3
        assert set(rows.filter(pl.col("doc_id") == doc_id)["pos"].to_list()) <= set(where)
    assert rows.height > 0


def _load_vlm(parts: dict):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(parts["vlm"], dtype=torch.float32).eval()


def test_vlm_on_text_equals_its_language_model(parts):
    vlm_text = _run(parts, "vlm_text", "vlm")
    lm_text = _run(parts, "lm_text", "lm")
    for sae in SAES:
        got, want = read_rows(vlm_text, sae), read_rows(lm_text, sae)
        assert set(got["group"].unique()) == {"text"}
        assert_same_rows(got, want)
    # hooks sit on the language model's layers (not the SigLIP tower's, also 4 long) and the forward
    # stops after the deepest one
    m = _load_vlm(parts)
    assert len(m.model.vision_tower.encoder.layers) == 4
    assert models.decoder_layers(m) is m.model.language_model.layers
    ran = []
    for i, layer in enumerate(m.model.language_model.layers):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    m.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    ids = torch.randint(5, 300, (1, 6))
    models.run_to_hooks(m, [models.parse_hook("blocks.1.hook_mlp_out", 4)], ids, torch.ones_like(ids))
    assert ran == [0]


def test_image_document_cut_to_context_size(parts, tmp_path):
    cfg = base_config(parts["vlm"], parts["saes"][:1], parts["data"], tmp_path / "run", data__image_column="image",
                      tokens={"context_size": 12}, data__shards=1)
    run(config.from_dict(cfg), executor="local")
    docs = pl.read_parquet(str(tmp_path / "run" / "docs" / "**" / "*.parquet")).sort("doc_id")
    full = pl.read_parquet(str(_run(parts, "vlm_image", "vlm", data__image_column="image") / "docs" / "**" /
                               "*.parquet")).sort("doc_id")
    for d, (a, b) in enumerate(zip(docs["token_ids"], full["token_ids"])):
        if d not in MISSING:
            assert a.to_list() == b.to_list()[:12]


def _numpy_transfer(runs: dict[str, Path], special: set[int], image_id: int,
                    th: dict) -> tuple[dict[tuple[str, int], str], dict[str, np.ndarray]]:
    """The workflow-1 rules in plain numpy, from the activation rows and the docs' token ids."""
    stats = {}
    for c, out in runs.items():
        docs = pl.read_parquet(str(out / "docs" / "**" / "*.parquet"))
        n = sum(sum(1 for t in ids if t not in special or t == image_id) for ids in docs["token_ids"])
        if c != "vlm_image":
            assert all(image_id not in ids for ids in docs["token_ids"])
        rows = read_rows(out)
        for sae in SAES:
            r = rows.filter(pl.col("sae") == sae)
            f, v = r["feature"].to_numpy(), r["value"].to_numpy().astype(np.float64)
            s, above = np.zeros(96), np.zeros(96)
            np.add.at(s, f, v)
            np.add.at(above, f[v > th["active_value"]], 1)
            stats[(c, sae)] = (s / n, above / n > th["active_fraction"])
    out = {}
    means = {f"{sae}/{c}": stats[(c, sae)][0] for sae in SAES for c in runs}
    for sae in SAES:
        (mb, ab), (mt, at), (mi, ai) = (stats[(c, sae)] for c in ("base", "vlm_text", "vlm_image"))
        for k in range(96):
            lo, hi = min(mb[k], mt[k]), max(mb[k], mt[k])
            rho = lo / hi if hi != 0 else None
            if not ab[k] and not at[k] and ai[k] and mi[k] > th["new_ratio"] * mb[k]:
                cls = "new_vision"
            elif not ab[k] and at[k] and mt[k] > th["new_ratio"] * mb[k]:
                cls = "new_text"
            elif ab[k] and at[k] and rho is not None and rho > th["stable_rho"]:
                cls = "stable"
            elif ab[k] and at[k] and rho is not None and th["shifted_rho"] < rho <= th["stable_rho"]:
                cls = "shifted"
            elif not (ab[k] or at[k] or ai[k]):
                cls = "dead"
            else:
                cls = "other"
            out[(sae, k)] = cls
    return out, means


def test_transfer_classes_equal_numpy(parts, tmp_path):
    from transformers import AutoProcessor

    from saeray.analysis.diff import PRESETS
    from saeray.analysis.transfer import write_transfer

    runs = {"base": _run(parts, "base_noisy", "lm_noisy"), "vlm_text": _run(parts, "vlm_text", "vlm"),
            "vlm_image": _run(parts, "vlm_image", "vlm", data__image_column="image")}
    code = cli.main(["transfer", str(runs["base"]), str(runs["vlm_text"]), str(runs["vlm_image"]),
                     "--out", str(tmp_path / "t"), "--active-fraction", "0.2"])
    assert code == 0
    th = {**PRESETS["vlm_transfer"], "active_fraction": 0.2}
    got = pl.read_parquet(tmp_path / "t" / "transfer.parquet")
    tok = AutoProcessor.from_pretrained(parts["vlm"]).tokenizer
    want, means = _numpy_transfer(runs, set(tok.all_special_ids), tok.convert_tokens_to_ids("<image>"), th)
    assert {(s, f): c for s, f, c in got.select("sae", "feature", "class").iter_rows()} == want
    for key, m in means.items():
        sae, c = key.split("/")
        np.testing.assert_allclose(got.filter(pl.col("sae") == sae).sort("feature")[f"mean_{c}"].to_numpy(), m,
                                   rtol=1e-6, atol=1e-9, err_msg=key)
    classes = set(want.values())
    assert {"new_vision", "new_text", "stable", "shifted"} <= classes, classes
    meta = json.loads(pq.read_schema(tmp_path / "t" / "transfer.parquet").metadata[b"saeray.transfer"])
    assert meta["thresholds"] == th and "class" in meta["definitions"]
    assert (tmp_path / "t" / "transfer.csv").exists() and (tmp_path / "t" / "transfer.json").exists()
    assert (got["n_tokens_vlm_image"] > got["n_tokens_vlm_text"]).all()  # image tokens count in the multimodal run


def test_transfer_refuses_other_saes(parts, tmp_path):
    from saeray.analysis.transfer import transfer

    other = tmp_path / "other"
    cfg = base_config(parts["lm"], parts["saes"][:1], parts["data"], other, positions={"mode": "modality"})
    run(config.from_dict(cfg), executor="local")
    with pytest.raises(ValueError, match="different SAEs"):
        transfer(other, _run(parts, "vlm_text", "vlm"), _run(parts, "vlm_image", "vlm", data__image_column="image"))


def _cli_error(tmp_path: Path, raw: dict, capsys) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(path), "--local"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_clear_errors_for_images(parts, tmp_path, capsys):
    raw = base_config(parts["vlm"], parts["saes"], parts["data"], tmp_path / "run", data__image_column="picture")
    err = _cli_error(tmp_path, raw, capsys)
    assert "'picture'" in err and "['text', 'image']" in err and "image_column" in err
    raw = base_config(parts["lm"], parts["saes"], parts["data"], tmp_path / "run", data__image_column="image")
    assert "not a vision-language model" in _cli_error(tmp_path, raw, capsys)
    raw = base_config(parts["vlm"], parts["saes"], parts["data"], tmp_path / "run", data__image_column="text")
    assert "must differ from data.text_column" in _cli_error(tmp_path, raw, capsys)
    raw = base_config(parts["vlm"], parts["saes"], parts["data"], tmp_path / "run", data__image_column="image",
                      data__max_tokens=100)
    assert "max_tokens" in _cli_error(tmp_path, raw, capsys)
    raw = base_config(parts["lm"], parts["saes"], parts["data"], tmp_path / "run")
    raw["model"]["kind"] = "image_text"
    assert "no vision_config" in _cli_error(tmp_path, raw, capsys)
    raw["model"]["kind"] = "vision"
    assert "'auto', 'causal_lm', 'image_text'" in _cli_error(tmp_path, raw, capsys)
    assert not (tmp_path / "run").exists()


def test_transfer_configs_agree():
    root = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    cfgs = {n: config.load(root / f"{n}.yaml") for n in ("gemma2-2b-text", "paligemma2-3b-text", "paligemma2-3b-image")}
    assert {(c.saes, c.data.dataset, c.data.text_column, c.tokens.context_size) for c in cfgs.values()} == {
        (cfgs["gemma2-2b-text"].saes, "/shared/data/image-captions", "caption", 1024)}
    assert cfgs["gemma2-2b-text"].saes[0].id == "layer_10/width_16k/canonical"
    assert [c.data.image_column for c in cfgs.values()] == [None, None, "image"]
    assert {c.positions.mode for c in cfgs.values()} == {"modality"}
    assert len({c.output.dir for c in cfgs.values()}) == 3


def test_text_stays_causal_in_a_paligemma_1_style_model():
    """Gemma-1 text models use SDPA, and PaliGemma marks their text config bidirectional: without explicit
    token types an unpadded text-only batch would attend to later tokens. run_to_hooks keeps it causal."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    text = GemmaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    m = PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=400,
                                                          vocab_size=500, projection_dim=64, hidden_size=64)).eval()
    site = [models.parse_hook("blocks.1.hook_resid_pre", 2)]
    ids = torch.randint(5, 300, (1, 9))
    whole = models.run_to_hooks(m, site, ids, torch.ones_like(ids))[site[0].name]
    prefix = models.run_to_hooks(m, site, ids[:, :4], torch.ones_like(ids[:, :4]))[site[0].name]
    torch.testing.assert_close(whole[:, :4], prefix)
