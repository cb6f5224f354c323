"""Byte-level BPE: lossless for any Unicode, one special end-of-text token."""
import pytest

from models.tokenizer import EOT, StreamDecoder, Tokenizer


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


def test_stream_decoder_holds_back_only_a_begun_character(tok):
    """A byte that begins no character (a continuation byte: any client can force a run of them
    with logit_bias) is one U+FFFD at once; it was held back for good, each step decoding the
    whole run again. A real U+FFFD character is plain text; a begun character waits for its end."""
    byte = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    cont = byte[b"\x80"]
    dec = StreamDecoder(tok)
    assert [dec.step(cont) for _ in range(1000)] == ["\ufffd"] * 1000 and dec.pending == b""
    assert "".join(dec.step(i) for i in tok.encode("a\ufffdb")) == "a\ufffdb"
    e_acute = [byte[bytes([b])] for b in "é".encode()]
    assert dec.step(e_acute[0]) == "" and dec.pending == b"\xc3" and dec.start_of(e_acute[1]) == 0
    assert dec.start_of(byte[b"\x81"]) == 0 and dec.start_of(byte[b"x"]) == 1  # 0x81 continues it, "x" cannot
    assert dec.step(e_acute[1]) == "é" and dec.flush() == ""
    assert dec.step(e_acute[0]) == "" and dec.flush() == "\ufffd" and dec.pending == b""


def test_training_cuts_words_longer_than_its_limit_and_encoding_keeps_them():
    """BPE training time grows with the square of a word's length (a 3 MB line without
    whitespace ran for most of an hour): training cuts such runs into words of at most
    MAX_TRAINING_WORD characters, so no token is longer; encoding still round-trips them."""
    from models.tokenizer import MAX_TRAINING_WORD

    long_word = "ab" * 300  # 600 characters; repeated, BPE would merge it into one token
    tok = Tokenizer.train([f"{long_word} some words {long_word}"] * 20, 400)
    assert tok.max_token_bytes <= MAX_TRAINING_WORD
    assert tok.decode(tok.encode(long_word + " x")) == long_word + " x"


@pytest.mark.parametrize("texts, vocab_size, message", [
    (["some text"], 100, "vocab_size=100: must be at least 257"),  # it returned 257 tokens in silence
    ("some text", 300, "texts: an iterable of strings, not one string"),  # it trained on single characters
])
def test_training_refuses_what_it_would_silently_change(texts, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.train(texts, vocab_size)
