"""Token display strings: character fragments show as their bytes, never as U+FFFD."""

from __future__ import annotations

from saeray.assets.tiny import make_tokenizer
from saeray.engine.tokenstr import token_strings


def test_fragments_show_their_bytes_and_whole_tokens_their_text(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    text = "héllo ✓ river"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    shown = token_strings(tok, ids)
    assert all("\ufffd" not in s for s in shown)
    # joining the pieces back (fragments through their hex bytes) gives the text again
    raw = b"".join(bytes.fromhex(s[1:-1]) if s.startswith("<") and s.endswith(">") else s.encode() for s in shown)
    assert raw.decode() == text
    assert "<e2>" in shown or any(s.startswith("<e2") for s in shown)  # the first byte of ✓ (e2 9c 93)
    assert token_strings(tok, tok(" river", add_special_tokens=False)["input_ids"]) == [" river"]
