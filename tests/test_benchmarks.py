"""The GPU-facing benchmark runs with torch alone; here on the CPU, on a small model."""
import math

from benchmarks.bandwidth import main as bandwidth


def test_bandwidth_benchmark_reports_speed_bandwidth_use_and_invariance():
    r = bandwidth(["--size", "small", "--device", "cpu", "--batch", "1", "4", "--new_tokens", "8",
                   "--trials", "2", "--copy_mib", "16"])
    assert set(r["paths"]) == {"static", "continuous"}  # CUDA graphs: on CUDA only
    assert r["bytes_per_step"] > 4e6  # the small model's 1.1 M float32 weights, read once a step
    assert r["bandwidth_gbs"] > 0
    for path in r["paths"].values():
        # figures only, no timing asserted: on a busy machine a difference of 8-token and 1-token runs
        # can even come out negative (it did, once, in CI)
        assert set(path["tokens_per_s"]) == {1, 4} and all(map(math.isfinite, path["tokens_per_s"].values()))
        assert math.isfinite(path["bandwidth_use"])
        assert path["invariant"] == path["trials"] == 2  # float32 on the CPU: logits agree to ~1e-6


def test_batch1_floor_reports_matrix_products_and_forward_pass():
    from benchmarks.batch1_floor import main as floor
    [r] = floor(["--shapes", "tiny", "--device", "cpu", "--calls", "3", "--copy_mib", "16"])
    assert r["weight_bytes"] == 4 * (r["params"] - 1024 * 32)  # float32, less the position table
    assert 0 < r["matrix_products_s"] and 0 < r["forward_s"]
    assert 0 < r["matrix_products_use"] and 0 < r["forward_use"]


def test_invariance_benchmark_counts_differing_requests_and_logprob_gap():
    from benchmarks.invariance import main as invariance
    r = invariance(["--requests", "8", "--max_tokens", "12"])
    assert (r["device"], r["dtype"]) == ("cpu", "torch.float32")  # the default, whatever the machine has
    for path in ("static", "continuous"):
        assert r[path]["requests"] == 8 and 0 <= r[path]["differ"] <= 8
    assert 0 <= r["static"]["max_logprob_diff"] < 1e-4  # rounding, not a different computation
    exact = invariance(["--requests", "8", "--max_tokens", "12", "--batch_invariant"])
    assert exact["static"]["differ"] == exact["continuous"]["differ"] == exact["static"]["max_logprob_diff"] == 0


def test_invariance_benchmark_runs_its_default_length_on_random_weights():
    """The README's 100 tokens: the random model's tokenizer had made 29 tokens of a 12-word
    prompt, past the 128-token context with 100 more."""
    from benchmarks.invariance import main as invariance
    assert invariance(["--requests", "16", "--max_tokens", "100"])["static"]["requests"] == 16


def test_serving_sim_static_policies_count_only_the_tokens_asked_for():
    """Static batching as our engine runs it answers each request when it finishes; padded, as
    `generate` runs it, every request of a batch answers when its longest is done."""
    import torch

    from benchmarks.serving_sim import WORDS, make_trace, serve_batches
    from models.engine import TextEngine
    from models.gpt import GPT, GPTConfig
    from models.tokenizer import Tokenizer

    torch.manual_seed(0)
    engine = TextEngine(GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=1, n_head=2, n_embd=16)),
                        Tokenizer.train([" ".join(WORDS) * 20], 300), device="cpu")
    for padded in (False, True):
        trace = make_trace(8, rate=0, seed=0, max_prompt_words=4, max_new=16)  # all at t=0: one batch
        serve_batches(engine, trace, max_batch=8, padded=padded)
        assert len({tr.req.max_tokens for tr in trace}) > 1
        assert all(0 < tr.tokens <= tr.req.max_tokens for tr in trace)  # fewer only at end-of-text
        assert (len({tr.done for tr in trace}) == 1) == padded


def test_kv_layout_benchmark_times_both_layouts_on_the_same_attention():
    from benchmarks.kv_layout import main as kv_layout
    r = kv_layout(["--batch", "2", "--contexts", "5", "--steps", "3", "--repeats", "1"])  # outputs compared inside
    assert set(r) == {(2, 5)} and set(r[2, 5]) == {"preallocated", "cat"}
    assert all(0 < alone <= both for both, alone in r[2, 5].values())


def test_bad_arguments_are_one_line_from_argparse_not_a_traceback_or_a_figure(capsys, tmp_path):
    """A count of zero ended in a ZeroDivisionError (or a negative figure: `--batch -1` printed
    -127,860 images/s), a missing device in a traceback after the model's set-up."""
    import pytest

    from benchmarks.images import main as images
    from benchmarks.invariance import main as invariance

    cases = [(bandwidth, ["--new_tokens", "1"], "--new_tokens: must be at least 2, got 1"),
             (bandwidth, ["--device", "cuda:999"], "--device: "),
             (images, ["--batch", "-1"], "--batch: must be at least 1, got -1"),
             (invariance, ["--model_dir", str(tmp_path / "none")], "no such folder"),
             (invariance, ["--threads", "-1"], "--threads: must be at least 0")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
