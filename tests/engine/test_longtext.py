"""A long text tokenized in pieces (engine/longtext.py) equals the same text tokenized whole, for the tiny
test tokenizer and the shipped models' tokenizers, on code, prose and odd whitespace."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
from helpers import make_tokenizer

from saeray.engine import longtext
from saeray.engine.config import PositionsConfig as Positions
from saeray.engine.contexts import Tokenization


def _long_text(n_chars: int) -> str:
    """Python source (indentation runs, blank lines), prose with punctuation, CJK and emoji, and long runs of
    spaces, newlines and one repeated character, in one string."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text() for name in ("json/decoder.py", "textwrap.py", "email/message.py",
                                                      "argparse.py", "ast.py")]
    parts.insert(2, "Der Hafen lag still. 港口很安静。 🚢⚓ naïve café — “quoted” ‘text’…\n" * 300)
    parts.insert(4, " " * 5000 + "\n" * 3000 + "=" * 7000 + "\t" * 500)
    text = "\n".join(parts)
    while len(text) < n_chars:
        text += text
    return text[:n_chars]


def _tokenizers(tmp_path):
    from saeray.engine import embedded

    yield "tiny", make_tokenizer(tmp_path / "tok")
    for which in ("gemma-3-270m", "smollm2-135m-instruct"):
        if embedded.available(which):
            from transformers import AutoTokenizer

            yield which, AutoTokenizer.from_pretrained(embedded.resolve(which)[0])


def test_pieces_equal_the_whole_text(tmp_path):
    text = _long_text(700_000)
    assert len(text) > 3 * longtext.PIECE_CHARS
    seen = []
    for name, tok in _tokenizers(tmp_path):
        whole = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        ids, starts, ends = longtext.encode_in_pieces(tok.backend_tokenizer, text)
        assert ids.tolist() == whole.ids, name
        assert np.array_equal(np.stack([starts, ends], 1), np.asarray(whole.offsets)), name
        t = Tokenization(tok, Positions(mode="sample", per_doc=4, word_final=True), prepend_bos=False,
                         context_size=64, exclude_special=True)
        assert t.encode(text).tolist() == whole.ids
        assert [a.tolist() for a in t.encode_many(["short one", text, ""])] == [
            tok("short one", add_special_tokens=False)["input_ids"], whole.ids, []]
        (got_ids, got_final), = t._encode_with_word_ends([text])
        import saeray.engine.contexts as contexts

        limit = contexts.LONG_CHARS
        try:  # the short-text path on the whole text is the reference for the word-final rule
            contexts.LONG_CHARS = len(text) + 1
            (ref_ids, ref_final), = Tokenization._encode_with_word_ends(t, [text])
        finally:
            contexts.LONG_CHARS = limit
        assert got_ids.tolist() == ref_ids.tolist() and np.array_equal(got_final, ref_final), name
        seen.append(name)
    assert seen[0] == "tiny"  # and the shipped models' tokenizers where their packages are installed


def test_one_huge_token_falls_back_to_the_whole_text(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")

    class OneToken:
        """A backend that makes the whole text one token: no piece boundary exists."""

        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [1], "offsets": [(0, len(text))]})()

    ids, starts, ends = longtext.encode_in_pieces(OneToken(), "x" * (longtext.LONG_CHARS + 10))
    assert ids.tolist() == [1] and ends.tolist() == [longtext.LONG_CHARS + 10]
    assert tok is not None
