"""The batched engine: equals the plain path, batch invariance, stop strings, streaming, params."""
import dataclasses
import pickle
import random
import re

import pytest
import torch

from models.engine import (CompletionRequest, EndBans, StopScanner, TextEngine, advance_text, reference_generate,
                           score_prompt, token_logprob)
from models.errors import InvalidParameter
from models.gpt import GPT, GPTConfig
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Return the value of the attribute. "
        "This module provides functions for working with files and directories. ") * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], 400)


@pytest.fixture(scope="module")
def engine(tok) -> TextEngine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=448, block_size=96, n_layer=2, n_head=2, n_embd=32))
    return TextEngine(model, tok, device="cpu")


def test_ids_past_the_tokenizer_are_never_drawn_scored_or_listed(engine, tok):
    """The model's vocabulary is padded past the tokenizer's (448 > the fixture's 400 or fewer):
    with untrained weights, padding ids were drawn (`<unused:N>`) and listed as alternatives."""
    assert engine.model.config.vocab_size > tok.vocab_size
    reqs = [CompletionRequest("the model", seed=s, max_tokens=24, logprobs=5, echo=True,
                              sampling=SamplingParams(temperature=2.0)) for s in range(8)]
    for out in engine.complete(reqs):
        entries = out.choices[0].logprobs
        assert all(lp.token_id < tok.vocab_size and all(i < tok.vocab_size for i in lp.top_ids) for lp in entries)
        assert not any("<unused" in name for lp in entries for name in [lp.token, *(lp.top or {})])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2),
    SamplingParams(temperature=0.9, presence_penalty=1.5, frequency_penalty=0.5),  # counts of the completion
    SamplingParams(temperature=0, frequency_penalty=2.0),
    SamplingParams(temperature=0.8, logit_bias=((5, -100.0), (17, 3.0), (30, 1.5)))])
def test_engine_equals_full_recompute_reference(engine, tok, params):
    got = engine.complete([CompletionRequest("The quick", seed=3, max_tokens=25, sampling=params)])[0]
    want = reference_generate(engine.model, [tok.encode("The quick")], 25, params, [3])[0]
    # the engine stops at end-of-text; the reference runs on: compare what the engine produced
    assert got.choices[0].token_ids == want[:len(got.choices[0].token_ids)]


def test_batch_invariance_alone_and_in_a_batch_of_eight(engine):
    target = CompletionRequest("Return the", seed=11, max_tokens=30, sampling=SamplingParams(temperature=1.0))
    alone = engine.complete([target])[0].choices[0].token_ids
    others = [CompletionRequest("This module " * (i + 1), seed=100 + i, max_tokens=5 + 4 * i,
                                sampling=SamplingParams(temperature=0.5 + 0.1 * i, top_k=10 * i, top_p=0.9),
                                stop=["e"] if i % 2 else [], n=1 + i % 2) for i in range(7)]
    batch = others[:4] + [target] + others[4:]
    assert len(batch) == 8
    assert engine.complete(batch)[4].choices[0].token_ids == alone


def test_n_choices_use_seed_plus_index(engine):
    two = engine.complete([CompletionRequest("The", seed=40, max_tokens=12, n=2)])[0]
    single = engine.complete([CompletionRequest("The", seed=41, max_tokens=12)])[0]
    assert two.choices[1].token_ids == single.choices[0].token_ids
    assert two.completion_tokens == sum(len(c.token_ids) for c in two.choices)


def test_greedy_is_deterministic_and_seed_independent(engine):
    a = engine.complete([CompletionRequest("The", seed=1, max_tokens=10, sampling=SamplingParams(temperature=0))])
    b = engine.complete([CompletionRequest("The", seed=2, max_tokens=10, sampling=SamplingParams(temperature=0))])
    assert a[0].choices[0].token_ids == b[0].choices[0].token_ids


def test_stop_scanner_across_token_boundaries(tok):
    text = "The quick brown fox jumps over the lazy dog."
    stop = "n fox j"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    starts = [len("".join(pieces[:k])) for k in range(len(pieces))]
    s = text.index(stop)
    assert any(s < st < s + len(stop) for st in starts)  # the stop string spans a token boundary
    scanner = StopScanner(tok, [stop, "zzz"])
    released = ""
    for i in ids:
        out, stopped = scanner.push(i)
        released += out
        assert stop not in released and not released.endswith("n fox")  # a stop prefix is held back
        if stopped:
            break
    assert stopped and released == text[:s]


def test_stop_string_in_generation_is_cut_and_reported(engine):
    free = engine.complete([CompletionRequest("The quick", seed=5, max_tokens=40,
                                              sampling=SamplingParams(temperature=0))])[0].choices[0]
    stop = free.text[10:14]
    assert len(stop) == 4
    got = engine.complete([CompletionRequest("The quick", seed=5, max_tokens=40, stop=[stop],
                                             sampling=SamplingParams(temperature=0))])[0].choices[0]
    assert got.finish_reason == "stop"
    assert got.text == free.text[:free.text.index(stop)]


def test_streaming_concatenates_to_the_completion(engine):
    req = CompletionRequest("The", seed=9, max_tokens=20, stop=["ck"], echo=True, logprobs=2)
    events = list(engine.stream([req]))
    whole = engine.complete([req])[0].choices[0]
    assert "".join(e.text for e in events) == whole.text and whole.text.startswith("The")
    assert [e.finish_reason for e in events].count(whole.finish_reason) == 1
    assert events[-1].finish_reason in ("stop", "length", "eos")
    assert len(whole.logprobs) == len(whole.token_ids)
    assert all(len(lp.top) <= 2 and lp.logprob <= 0 for lp in whole.logprobs)


def test_logprobs_leave_with_the_text_a_stop_string_held_back(engine):
    """An event carries the logprob entries of the text it releases: the tokens of text that might
    begin a stop string wait with it, and the last event carries the rest (a stop string's own
    tokens), as the whole answer has them. A byte that can begin no character (0xFE) is one
    U+FFFD at once (it was held until the next token)."""
    req = CompletionRequest("The quick", seed=2000, max_tokens=12, logprobs=1)
    free = [lp for e in engine.stream([req]) for lp in e.logprobs]
    assert [lp.token for lp in free[2:9]] == ["bytes:\\xfe", "2", "/", "m", "S", "or", "p"]  # this sample
    held = list(engine.stream([dataclasses.replace(req, stop=["mSorZ"])]))  # held, then released
    assert [(e.text, [lp.token for lp in e.logprobs]) for e in held[2:9]] == [
        ("\ufffd", ["bytes:\\xfe"]), ("2", ["2"]), ("/", ["/"]), ("", []), ("", []), ("", []),
        ("mSorp", ["m", "S", "or", "p"])]
    assert [lp for e in held for lp in e.logprobs] == free
    cut = list(engine.stream([dataclasses.replace(req, stop=["mSor"])]))
    assert cut[-1].finish_reason == "stop" and [lp.token for lp in cut[-1].logprobs] == ["m", "S", "or"]
    assert [lp for e in cut for lp in e.logprobs] == free[:8]


def test_logprob_tokens_name_split_characters_by_their_bytes_and_offsets_point_into_the_text(tok):
    """A character split across byte-level tokens: each part is named by its bytes (OpenAI's
    "bytes:" names; they all decode to U+FFFD, so they would collide as keys of top_logprobs),
    and all its parts point at the character, so the offsets of later tokens stay right."""
    names = [tok.token_name(i) for i in range(tok.vocab_size + 48)]  # a model's vocabulary may be padded past it
    assert len(set(names)) == len(names)

    def run(ids: list[int]) -> tuple[str, list[tuple[str, int]]]:
        scanner, text, entries = StopScanner(tok, []), "", []
        for i, t in enumerate(ids):
            entry = token_logprob(tok, t, ([-1.0], [[]], [[]]), 0, 0, scanner)
            released, lps, _ = advance_text(scanner, t, tok.eot_id, i + 1, len(ids), entry)
            text, entries = text + released, entries + lps
        return text, [(e.token, e.offset) for e in entries]

    byte = {name: i for i, name in enumerate(names) if name.startswith("bytes:")}
    text, entries = run(tok.encode("Hé😀 the") + [byte["bytes:\\x81"]] + tok.encode(" x"))
    assert text == "Hé😀 the\ufffd x"  # a continuation byte on its own is never valid UTF-8
    assert entries == [("H", 0), ("bytes:\\xc3", 1), ("bytes:\\xa9", 1),
                       *[(f"bytes:\\x{b:02x}", 2) for b in "😀".encode()], (" the", 3), ("bytes:\\x81", 7),
                       (" ", 8), ("x", 9)]
    text, entries = run([byte["bytes:\\xf0"], byte["bytes:\\x9f"]] + tok.encode(" x"))  # a character cut short
    assert text == "\ufffd x" and entries == [("bytes:\\xf0", 0), ("bytes:\\x9f", 0), (" ", 1), ("x", 2)]


def test_a_stop_string_in_the_text_flushed_at_the_end_still_stops(tok):
    """A row that ends (length or end-of-text) inside a character flushes it as U+FFFD: a stop
    string there cuts the text and makes the finish reason "stop", as anywhere else."""
    names = [tok.token_name(i) for i in range(tok.vocab_size)]
    cut_short = [names.index(f"bytes:\\x{b:02x}") for b in "日".encode()[:2]]  # two of its three bytes
    for ending, reason in (([], "length"), ([tok.eot_id], "eos")):
        ids = [*tok.encode("ab"), *cut_short, *ending]
        for stop, want in (([], ("ab\ufffd", reason)), (["b\ufffd"], ("a", "stop"))):
            scanner, text, why = StopScanner(tok, stop), "", None
            for i, t in enumerate(ids):
                out, _, why = advance_text(scanner, t, tok.eot_id, i + 1, len(ids) if reason == "length" else 99)
                text += out
                if why:
                    break
            assert (text, why) == want, (reason, stop)


def test_finish_reason_length(engine):
    c = engine.complete([CompletionRequest("The", seed=0, max_tokens=3)])[0]
    assert c.choices[0].finish_reason in ("length", "eos") and len(c.choices[0].token_ids) <= 3


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=-1), "max_tokens"), (dict(n=0), "n"), (dict(n=99), "n"), (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"), (dict(seed=2**32 - 2, n=3), "seed"),  # choice i uses seed + i: 32 bits
    (dict(sampling=SamplingParams(top_k=2**63)), "top_k"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(logprobs=9), "logprobs"),
    (dict(sampling=SamplingParams(top_p=0)), "top_p"), (dict(sampling=SamplingParams(temperature=-1)), "temperature"),
    (dict(prompt="fox " * 500), "prompt"), (dict(max_tokens=90, prompt="fox " * 20), "max_tokens"),
    # wrong types, as a library caller may pass them: named, not a TypeError from inside torch
    (dict(max_tokens=5.0), "max_tokens"), (dict(n=True), "n"), (dict(seed=1.5), "seed"), (dict(logprobs=2.5), "logprobs"),
    (dict(stop="abc"), "stop"), (dict(stop=[1]), "stop"), (dict(prompt=None), "prompt"), (dict(sampling=None), "sampling"),
    (dict(sampling=SamplingParams(top_k=2.5)), "top_k"), (dict(sampling=SamplingParams(temperature="1")), "temperature"),
    (dict(min_tokens=17), "min_tokens"), (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=2.0), "min_tokens"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(echo="yes"), "echo"), (dict(prompt_logprobs=None), "prompt_logprobs"),
    (dict(stop_token_ids=[448]), "stop_token_ids"), (dict(stop_token_ids=[1] * 17), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_requests_raise_naming_the_parameter(engine, kw, param):
    req = CompletionRequest(**{"prompt": "The", "seed": 0, **kw})
    with pytest.raises(InvalidParameter) as e:
        engine.validate(req)
    assert e.value.param == param
    with pytest.raises(InvalidParameter):
        list(engine.stream([req]))


def test_a_prompt_past_the_context_says_so_in_openais_code_and_words(engine):
    """OpenAI's code, context_length_exceeded, and its words, which LiteLLM matches to raise its
    ContextWindowExceededError (it did not recognise "exceeds the model's maximum context length")."""
    for req, asked in ((CompletionRequest("fox " * 500, seed=0), r"\d+ tokens \(\d+ in the prompt, 16 for the"),
                       (CompletionRequest("fox " * 20, seed=0, max_tokens=90), r"\d+ tokens \(\d+ in the prompt, 90 for"),
                       (CompletionRequest("fox", seed=0, max_tokens=96), r"at least 97 tokens \(96 for the completion")):
        with pytest.raises(InvalidParameter, match=r"This model's maximum context length is 96 tokens\. However, you "
                                                   rf"requested {asked}") as e:
            engine.validate(req)
        assert e.value.code == "context_length_exceeded"
        assert pickle.loads(pickle.dumps(e.value)).code == "context_length_exceeded"  # from the engine process


def test_truncation_keeps_the_end_of_a_long_prompt(engine):
    req = CompletionRequest("fox " * 500, seed=0, max_tokens=8, truncate=True)
    c = engine.complete([req])[0]
    assert c.prompt_tokens == engine.block_size - 8 and len(c.choices[0].token_ids) >= 1


def test_empty_prompt_starts_a_document(engine):
    c = engine.complete([CompletionRequest("", seed=0, max_tokens=4)])[0]
    assert c.prompt_tokens == 1


def test_stop_scanner_matches_decoding_the_whole_completion():
    """Random token sequences, multi-byte characters split across tokens included: the text the
    scanner releases equals decoding all tokens at once, cut at the first stop string."""
    tok = Tokenizer.train(["naïve café 日本語のテキスト emoji 🙂🚀 Ωμέγα the of and " * 50], 400)
    rng = random.Random(0)
    for trial in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        ids = [i for i in ids if i != tok.eot_id] or [0]
        full = tok.decode(ids)
        candidates = [full[a:a + rng.randint(1, 4)] for a in range(len(full))] if trial % 2 else []
        stop = [s for s in rng.sample(candidates, min(2, len(candidates))) if "\ufffd" not in s]
        scanner = StopScanner(tok, stop)
        released, stopped = "", False
        for i in ids:
            out, stopped = scanner.push(i)
            released += out
            assert not any(s in released for s in stop)
            if stopped:
                break
        if not stopped:
            rest, stopped = scanner.flush()
            released += rest
        hits = [full.find(s) for s in stop if s in full]
        assert stopped == bool(hits)
        assert released == (full[:min(hits)] if hits else full), (ids, stop)


def test_logit_bias_token_ids_must_be_in_the_vocabulary(engine, tok):
    req = CompletionRequest("The", seed=1, max_tokens=3, sampling=SamplingParams(logit_bias=((tok.vocab_size, 1.0),)))
    with pytest.raises(InvalidParameter, match="logit_bias: token ids must be below") as e:
        engine.complete([req])
    assert e.value.param == "logit_bias"


def test_min_tokens_and_ignore_eos_hold_end_of_text_back(engine, tok):
    """End-of-text, all but forced by a bias, comes right after the min_tokens; never with
    ignore_eos. Alone and in a batch whose other rows finish and leave around them."""
    forced_eos = SamplingParams(logit_bias=((tok.eot_id, 100.0),))

    def req(seed: int, **kw) -> CompletionRequest:
        return CompletionRequest("The", seed=seed, max_tokens=10, sampling=forced_eos, **kw)

    cases = [(dict(), (1, "eos")), (dict(min_tokens=4), (5, "eos")), (dict(ignore_eos=True), (10, "length")),
             (dict(min_tokens=10), (10, "length")), (dict(min_tokens=6, n=2), (7, "eos"))]
    reqs = [req(i, **kw) for i, (kw, _) in enumerate(cases)]
    short = CompletionRequest("The quick", seed=9, max_tokens=2)  # leaves the batch after two steps
    batch = engine.complete([reqs[2], short, *reqs])
    for r, (kw, want) in zip(reqs, cases):
        alone = engine.complete([r])[0]
        assert {(len(c.token_ids), c.finish_reason) for c in alone.choices} == {want}, kw
        assert [c.token_ids for c in alone.choices] == [c.token_ids for c in batch[2 + reqs.index(r)].choices]
    assert tok.eot_id not in batch[0].choices[0].token_ids


def test_skip_special_tokens_false_ends_the_text_with_end_of_texts_own(engine, tok):
    """vLLM's skip_special_tokens false: a choice that draws end-of-text ends with its text, in
    the text and in a stream's last event; a stop string found first cuts the text before it."""
    forced_eos = SamplingParams(logit_bias=((tok.eot_id, 100.0),))
    req = CompletionRequest("The", seed=3, max_tokens=10, sampling=forced_eos, min_tokens=2, skip_special_tokens=False)
    [choice] = engine.complete([req])[0].choices
    plain = engine.complete([dataclasses.replace(req, skip_special_tokens=True)])[0].choices[0]
    assert choice.finish_reason == "eos" and choice.token_ids == plain.token_ids
    assert choice.text == plain.text + "<|endoftext|>"
    events = list(engine.stream([req]))
    assert events[-1].text.endswith("<|endoftext|>") and "".join(ev.text for ev in events) == choice.text
    # a stop string completed as the row ends (a character cut short flushes as U+FFFD) cuts first
    names = [tok.token_name(i) for i in range(tok.vocab_size)]
    ids = [*tok.encode("ab"), *[names.index(f"bytes:\\x{b:02x}") for b in "日".encode()[:2]], tok.eot_id]
    for stop, want in (([], "ab\ufffd<|endoftext|>"), (["b\ufffd"], "a")):
        scanner = StopScanner(tok, stop, eot_text="<|endoftext|>")
        assert "".join(advance_text(scanner, t, tok.eot_id, i + 1, 99)[0] for i, t in enumerate(ids)) == want


def test_min_tokens_hold_stop_strings_back_as_vllm_does(engine, tok):
    """vLLM checks no stop string before a choice's min_tokens; one completed then is plain text
    that never matches later. A forced token X makes the text XXXX...: stop "X" ends the choice at
    token min_tokens + 1, and "XX" (completed at token 2, 3, ...) there too, after the text so far."""
    x = tok.encode("The")[0]
    xs = tok.decode([x])
    assert xs and (xs * 2).find(xs, 1) == len(xs)  # X's text does not overlap itself

    def ask(stop: str, **kw):
        req = CompletionRequest("Hello", seed=1, max_tokens=8, stop=[stop], ignore_eos=True,
                                sampling=SamplingParams(logit_bias=((x, 100.0),)), **kw)
        return engine.complete([req])[0].choices[0], req

    cases = [(xs, {}, (1, "", "stop")), (xs, dict(min_tokens=3), (4, xs * 3, "stop")),
             (xs * 2, dict(min_tokens=3), (4, xs * 2, "stop")), (xs * 2, {}, (2, "", "stop")),
             (xs, dict(min_tokens=8), (8, xs * 8, "length"))]
    for stop, kw, want in cases:
        c, req = ask(stop, **kw)
        assert (len(c.token_ids), c.text, c.finish_reason) == want, (stop, kw)
        events = list(engine.stream([req]))
        assert ("".join(e.text for e in events), events[-1].finish_reason) == want[1:]


def test_prompt_logprobs_score_a_text_as_decoding_it_did(engine, tok):
    """Scoring prompt + completion gives the completion's tokens the logprobs (and alternatives)
    the KV-cache decode reported for them: one full forward pass against the cached steps."""
    made = engine.complete([CompletionRequest("The quick brown", seed=3, max_tokens=12, logprobs=3,
                                              sampling=SamplingParams(temperature=0.8), ignore_eos=True)])[0].choices[0]
    prompt = tok.encode("The quick brown")
    entries = score_prompt(engine.model, tok, prompt + made.token_ids, 3)  # the ids (re-encoding the text may differ)
    assert len(entries) == len(prompt) + 12
    assert entries[0].logprob is None and entries[0].top is None and entries[0].offset == 0
    for got, want in zip(entries[len(prompt):], made.logprobs):
        assert got.token == want.token and got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert got.top.keys() == want.top.keys()
        assert got.offset == want.offset + len("The quick brown")


def test_max_tokens_zero_scores_a_prompt(engine, tok):
    text = "The lazy dog jumps over the quick brown fox."
    scored = engine.complete([CompletionRequest(text, seed=0, max_tokens=0, logprobs=2, prompt_logprobs=True)])[0]
    c = scored.choices[0]
    assert (c.text, c.token_ids, c.finish_reason, scored.completion_tokens) == ("", [], "length", 0)
    assert len(c.prompt_logprobs) == scored.prompt_tokens == len(tok.encode(text))
    assert "".join(e.token for e in c.prompt_logprobs) == text  # plain ASCII: token names are their texts
    assert all(text[e.offset:].startswith(e.token) for e in c.prompt_logprobs)
    assert all(e.logprob <= 0 and len(e.top) == 2 for e in c.prompt_logprobs[1:])


def test_echo_prompt_logprobs_and_max_tokens_zero_in_a_batch(engine):
    reqs = [CompletionRequest("The lazy dog", seed=1, max_tokens=0, echo=True, n=2, logprobs=1, prompt_logprobs=True),
            CompletionRequest("Return the", seed=2, max_tokens=5),
            CompletionRequest("This module", seed=3, max_tokens=4, logprobs=0, prompt_logprobs=True),
            CompletionRequest("fox", seed=4, max_tokens=0)]
    got = engine.complete(reqs)
    assert [c.text for c in got[0].choices] == ["The lazy dog"] * 2 and got[0].completion_tokens == 0
    assert got[0].choices[0].prompt_logprobs == got[0].choices[1].prompt_logprobs
    assert len(got[0].choices[0].prompt_logprobs) == got[0].prompt_tokens
    assert got[1].choices[0].token_ids == engine.complete([reqs[1]])[0].choices[0].token_ids  # undisturbed
    assert len(got[2].choices[0].token_ids) >= 1 and len(got[2].choices[0].prompt_logprobs) == got[2].prompt_tokens
    assert got[2].choices[0].prompt_logprobs[1].top == {}  # logprobs=0: no alternatives
    last = got[3].choices[0]
    assert (last.text, last.finish_reason, last.prompt_logprobs) == ("", "length", None)


def test_end_bans_are_built_again_only_when_the_banned_rows_change(tok):
    import types

    bans = EndBans(tok.eot_id, torch.device("cpu"))
    scanner = types.SimpleNamespace(stop_ids=frozenset())
    rows = [types.SimpleNamespace(tokens=[], min_tokens=2, ignore_eos=False, scanner=scanner),
            types.SimpleNamespace(tokens=[], min_tokens=0, ignore_eos=False, scanner=scanner)]
    first = bans(rows)
    assert first[0].tolist() == [0] and first[1].tolist() == [tok.eot_id]
    rows[0].tokens.append(5)
    assert bans(rows) is first  # the same rows: no new tensors (host-to-device copies on a GPU)
    rows[0].tokens.append(6)
    assert bans(rows) is None and bans(rows[::-1]) is None


def test_a_prompt_given_as_token_ids_decodes_as_its_text(engine, tok):
    text = CompletionRequest("The quick brown", seed=5, max_tokens=8)
    ids = CompletionRequest("", seed=5, max_tokens=8, prompt_ids=tok.encode("The quick brown"))
    got = engine.complete([text, ids])
    assert got[0].choices[0].token_ids == got[1].choices[0].token_ids and got[0].prompt_tokens == got[1].prompt_tokens
    for bad in ([tok.vocab_size], [-1], [1.0], "12"):
        with pytest.raises(InvalidParameter) as e:
            engine.validate(CompletionRequest("", seed=0, prompt_ids=bad))
        assert e.value.param == "prompt"


def test_prompt_logprob_entries_say_where_their_text_ends(engine, tok):
    """Their `end` was always 0, before their offset, where a choice's entries say where each
    token's text ends (a token ending inside a character: where that character ends)."""
    req = CompletionRequest("ab ça € de", seed=3, max_tokens=1, echo=True, prompt_logprobs=True, logprobs=0)
    entries = engine.complete([req])[0].choices[0].prompt_logprobs
    assert all(e.offset <= e.end for e in entries) and entries[-1].end == len(req.prompt)
    for e in entries:
        piece = tok.decode([e.token_id])
        if "\ufffd" not in piece:  # a whole character or more: its own text
            assert req.prompt[e.offset:e.end] == piece, (e, piece)


@pytest.mark.parametrize("device, message", [("bogus", "must be auto, cpu, cuda or cuda:N"),
                                             ("meta", "must be auto, cpu, cuda or cuda:N"),
                                             ("cuda:64", "this machine has"),
                                             ("cuda:999", "this machine has")])  # torch's 8-bit index: cuda:-25
def test_an_engine_refuses_a_device_it_cannot_use(tok, device, message):
    """torch's own errors (Torch not compiled with CUDA enabled, Expected one of cpu, cuda...) came
    from deep inside the model's move."""
    model = GPT(GPTConfig(vocab_size=448, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=re.escape(f"device={device!r}: {message}")):
        TextEngine(model, tok, device=device)


def test_an_engine_refuses_a_tokenizer_larger_than_its_model_s_vocabulary(tok):
    """Built directly (the model-directory loader checks it): an IndexError deep in torch at the first prompt."""
    small = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=rf"the tokenizer has {tok.vocab_size} tokens, more than the model's "
                                         r"vocab_size 320"):
        TextEngine(small, tok, device="cpu")


@pytest.mark.parametrize("field, value", [("prompt", "\ud800abc"), ("stop", ["a\udfff"])])
def test_a_lone_surrogate_is_an_invalid_parameter(engine, field, value):
    """Not valid Unicode: the tokenizer raised a bare `TypeError: TextInputSequence must be str`."""
    req = CompletionRequest("abc", seed=1, max_tokens=2)
    setattr(req, field, value)
    with pytest.raises(InvalidParameter, match="lone surrogate") as e:
        engine.complete([req])
    assert e.value.param == field


def test_stop_token_ids_end_a_choice_and_include_stop_str_in_output_keeps_the_stop(engine, tok):
    """vLLM's: a stop token ends a choice as a stop string does (finish "stop"; the token counts,
    its text is dropped unless include_stop_str_in_output); min_tokens holds it back too."""
    free = engine.complete([CompletionRequest("The quick", seed=7, max_tokens=12, ignore_eos=True)])[0].choices[0]
    ids, at = free.token_ids, 4
    first = ids.index(ids[at])  # the stop token's first appearance ends the choice
    req = CompletionRequest("The quick", seed=7, max_tokens=12, ignore_eos=True, stop_token_ids=[ids[at]])
    stopped, kept, later = engine.complete([req, dataclasses.replace(req, include_stop_str_in_output=True),
                                            dataclasses.replace(req, min_tokens=first + 2)])
    c = stopped.choices[0]
    assert (c.token_ids, c.finish_reason) == (ids[:first + 1], "stop")
    assert c.text == tok.decode(ids[:first]) and kept.choices[0].text == tok.decode(ids[:first + 1])
    assert ids[at] not in later.choices[0].token_ids[:first + 2]  # not drawn before min_tokens

    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    plain, with_stop = engine.complete([CompletionRequest("The quick", seed=7, max_tokens=12, ignore_eos=True,
                                                          stop=[stop], include_stop_str_in_output=flag)
                                        for flag in (False, True)])
    cut = text.index(stop)
    assert (plain.choices[0].text, with_stop.choices[0].text) == (text[:cut], text[:cut + len(stop)])
