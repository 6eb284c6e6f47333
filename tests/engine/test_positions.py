"""Position selection (engine/positions.py), every mode of positions.mode, against positions written by hand."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_tokenizer

from saeray.engine.config import MarkerGroup, PositionsConfig
from saeray.engine.partials import draws_np
from saeray.engine.positions import PositionSelector, PositionsError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ids(tok):
    """Ids of the tiny tokenizer's special tokens and of a few words."""
    word = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ("of", "to", "is")}
    assert all(len(v) == 1 for v in word.values()), word  # one token each, so the documents below read plainly
    assert tok("ofto", add_special_tokens=False)["input_ids"] == word["of"] + word["to"]
    return {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id,
            "start": tok.convert_tokens_to_ids("<|im_start|>"), "end": tok.convert_tokens_to_ids("<|im_end|>"),
            **{w: v[0] for w, v in word.items()}}


def arr(*xs: int) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


def selector(tok, exclude_special: bool = True, **positions) -> PositionSelector:
    return PositionSelector(PositionsConfig(**positions), tok, exclude_special=exclude_special)


def test_counted_leaves_out_special_tokens(tok, ids):
    d = arr(ids["bos"], ids["of"], ids["to"], ids["eos"], ids["is"], ids["pad"])
    assert selector(tok).counted(d).tolist() == [False, True, True, False, True, False]
    assert selector(tok, exclude_special=False).counted(d).tolist() == [True] * 6


def test_mode_all_and_last(tok, ids):
    d = arr(ids["of"], ids["start"], ids["to"], ids["is"], ids["eos"])
    assert selector(tok).select(d)["all"].tolist() == [0, 2, 3]
    assert selector(tok, exclude_special=False).select(d)["all"].tolist() == [0, 1, 2, 3, 4]
    assert selector(tok, mode="last").select(d)["last"].tolist() == [3]  # the EOS after it does not count
    assert selector(tok, mode="last").select(arr(ids["eos"]))["last"].tolist() == []
    assert selector(tok, mode="all").select(arr())["all"].tolist() == []
    assert selector(tok).select(d)["all"].dtype == np.int32


def test_mode_markers(tok, ids):
    t, c, s, start = ids["of"], ids["to"], ids["is"], ids["start"]
    groups = {"after": MarkerGroup(marker="<|im_start|>", offset=1), "at": MarkerGroup(marker="<|im_start|>"),
              "before_to": MarkerGroup(marker="to", offset=-1), "pair": MarkerGroup(marker="ofto")}
    sel = selector(tok, mode="markers", groups=groups)
    assert sel.group_names == ["after", "at", "before_to", "pair"]
    d = arr(start, t, c, s, start, c, t, c, start)
    #       0      1  2  3  4      5  6  7  8
    got = {g: p.tolist() for g, p in sel.select(d).items()}
    assert got == {"after": [1, 5],  # the marker at 8 has nothing after it
                   "at": [0, 4, 8],
                   "before_to": [1, 4, 6],
                   "pair": [2, 7]}  # a marker of several tokens is anchored at its last one
    assert {g: p.tolist() for g, p in sel.select(arr(t)).items()} == {"after": [], "at": [], "before_to": [],
                                                                      "pair": []}


def test_two_markers_pointing_at_one_position_give_it_once(tok, ids):
    t, c = ids["of"], ids["to"]
    sel = selector(tok, mode="markers", groups={"g": MarkerGroup(marker="of", offset=2)})
    assert sel.select(arr(t, t, c, c))["g"].tolist() == [2, 3]
    sel = selector(tok, mode="markers", groups={"g": MarkerGroup(marker="to", offset=-2)})
    assert sel.select(arr(c, t, c, c))["g"].tolist() == [0, 1]  # 2 - 2 and 3 - 2; 0 - 2 is outside


def test_a_marker_that_tokenizes_to_nothing_is_refused(tok):
    with pytest.raises(PositionsError, match="positions.groups.g.marker"):
        selector(tok, mode="markers", groups={"g": MarkerGroup(marker="")})


def test_mode_modality(tok, ids):
    image = ids["end"]  # any id serves as the image token here
    d = arr(image, image, ids["bos"], ids["of"], ids["to"], image)
    both = PositionSelector(PositionsConfig(mode="modality"), tok, exclude_special=True, image_token_id=image,
                            images=True)
    assert both.group_names == ["image", "text"]
    assert {g: p.tolist() for g, p in both.select(d).items()} == {"image": [0, 1, 5], "text": [3, 4]}
    text_only = PositionSelector(PositionsConfig(mode="modality"), tok, exclude_special=True, image_token_id=image)
    assert text_only.group_names == ["text"]
    assert {g: p.tolist() for g, p in text_only.select(d).items()} == {"text": [3, 4]}


def _sample_by_hand(doc_id: int, token_ids: list[int], counted: list[bool], per_doc: int, seed: int,
                    within: int | None = None, word_final: list[bool] | None = None) -> list[int]:
    """The documented draw, one candidate at a time: the per_doc candidates with the smallest (draw, pos)."""
    cands = [p for p in range(len(token_ids)) if counted[p] and (within is None or p < within)
             and (word_final is None or word_final[p])]
    draw = {p: int(draws_np(np.array([doc_id]), np.array([p]), seed)[0]) for p in cands}
    return sorted(sorted(cands, key=lambda p: (draw[p], p))[:per_doc])


@pytest.mark.parametrize("per_doc,seed,within", [(1, 0, None), (3, 0, None), (3, 7, None), (2, 1, 5), (50, 0, None)])
def test_mode_sample(tok, ids, per_doc, seed, within):
    words = [ids["of"], ids["to"], ids["is"]]
    d = arr(*[words[i % 3] for i in range(12)], ids["eos"])
    sel = selector(tok, mode="sample", per_doc=per_doc, seed=seed, within=within)
    counted = [True] * 12 + [False]
    for doc_id in (0, 5, (3 << 32) | 17):
        got = sel.select(d, doc_id)["sample"].tolist()
        assert got == _sample_by_hand(doc_id, d.tolist(), counted, per_doc, seed, within)
        assert len(got) == min(per_doc, 12 if within is None else within)
    if per_doc < 12 and within is None:  # other documents and seeds draw other positions
        drawn = {tuple(sel.select(d, doc_id)["sample"].tolist()) for doc_id in range(20)}
        assert len(drawn) > 1


def test_mode_sample_word_final(tok, ids):
    d = arr(ids["of"], ids["to"], ids["is"], ids["of"], ids["to"])
    final = np.array([False, True, False, True, True])
    sel = selector(tok, mode="sample", per_doc=2, word_final=True)
    for doc_id in range(10):
        got = sel.select(d, doc_id, final)["sample"].tolist()
        assert got == _sample_by_hand(doc_id, d.tolist(), [True] * 5, 2, 0, word_final=final.tolist())
        assert set(got) <= {1, 3, 4}
    with pytest.raises(PositionsError, match="word_final"):
        sel.select(d, 0, None)
