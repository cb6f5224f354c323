"""service/tgi.py without a server: each token's share of the text (TokenSplitter) on real
engine events, when stop sequences hold text back and characters span tokens."""
from __future__ import annotations

import torch

from models.engine import CompletionRequest, StopScanner, StreamEvent, TextEngine, advance_text, token_logprob
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from service.schemas import TGIParameters
from service.tgi import TokenSplitter, completion_request, samples


def test_each_token_gets_its_own_text_when_stop_sequences_hold_text_back():
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog, héllo wörld 🙂 " * 40], 400)
    torch.manual_seed(0)
    engine = TextEngine(GPT(GPTConfig(vocab_size=448, block_size=128, n_layer=1, n_head=2, n_embd=32)), tok, "cpu")
    # stops that begin with common characters: text ending in one is held back, often
    stops = ["e~", " ~", "o~", "🙂🙂"]
    reqs = [CompletionRequest("the", seed=s, max_tokens=40, logprobs=0, include_stop_str_in_output=True, stop=stops,
                              ignore_eos=True, sampling=SamplingParams(temperature=1.5)) for s in range(12)]
    events = [[] for _ in reqs]
    for ev in engine.stream(reqs):
        events[ev.request].append(ev)
    held = checked = 0
    for evs in events:
        splitter = TokenSplitter()
        pieces = [piece for ev in evs for piece in splitter.add(ev)]
        text = "".join(ev.text for ev in evs)
        held += sum(len(ev.logprobs) == 0 for ev in evs)  # events whose token waited
        assert "".join(p for _, p in pieces) == text and len(pieces) == len(evs)
        for entry, piece in pieces:
            own = tok.decode([entry.token_id])
            # a whole token, not cut by a stop (random weights also draw broken UTF-8, whose
            # replacement character comes out with the token after it)
            if "\ufffd" not in own + piece and entry.end <= len(text):
                assert piece == own, (entry, piece, own)
                checked += 1
    assert held > 10 and checked > 200, (held, checked)


def test_a_token_ending_inside_a_character_gets_nothing_the_one_completing_it_the_character():
    """As TGI's tokens: € split over three byte tokens gave the first the character and the
    others nothing, the other way round."""
    tok = Tokenizer.train(["plain ascii text only " * 40], 300)
    byte = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    ids = [byte[bytes([b])] for b in "€".encode()] + [byte[b"a"]]
    scanner, splitter, pieces = StopScanner(tok, []), TokenSplitter(), []
    for i, t in enumerate(ids):
        entry = token_logprob(tok, t, ([-1.0], [[]], [[]]), 0, 0, scanner)
        text, lps, reason = advance_text(scanner, t, tok.eot_id, i + 1, len(ids), entry)
        pieces += [piece for _, piece in splitter.add(StreamEvent(0, 0, text, 1, lps, reason, t))]
    assert pieces == ["", "", "€", "a"]


def test_tgi_sampling_rules():
    greedy = completion_request("x", [1], TGIParameters(), seed=3, context=64)
    assert greedy.sampling.temperature == 0 and greedy.max_tokens == 63 and greedy.include_stop_str_in_output
    for on in (dict(do_sample=True), dict(temperature=0.5), dict(top_k=5), dict(top_p=0.9), dict(typical_p=0.9)):
        assert samples(TGIParameters(**on)), on
    for off in (dict(temperature=1.0), dict(top_p=1.0), dict(typical_p=1.0)):
        assert not samples(TGIParameters(**off)), off
    assert completion_request("x", [1] * 10, TGIParameters(), seed=3, context=200).max_tokens == 100
