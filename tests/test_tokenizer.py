"""Byte-level BPE: lossless for any Unicode, one special end-of-text token."""
import pytest

from models.tokenizer import EOT, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat. " * 50, "def f(x):\n    return x\n" * 20], 320)


@pytest.mark.parametrize("text", ["", "plain ascii", "héllo wörld", "中文字符 and emoji 🤖👍🏽", "tabs\tand\nnewlines\r\n",
                                  "\x00\x01 control", "zero\u200bwidth", "  leading and trailing  ", "ﬁ ligature é"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_end_of_text_is_one_special_token(tok):
    assert tok.decode([tok.eot_id]) == EOT
    # typed by a user it is plain text, not the control token
    assert tok.eot_id not in tok.encode(f"a {EOT} b")


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode("the cat 🤖") == tok.encode("the cat 🤖") and again.eot_id == tok.eot_id
