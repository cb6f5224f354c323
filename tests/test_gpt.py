"""The network: shapes, KV-cache decoding equals full recompute, GPT-2 import equals transformers."""
import json
import re

import pytest
import torch

from models.artifacts import ArtifactError
from models.gpt import GPT, GPTConfig, from_hf_gpt2


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


@pytest.mark.parametrize("settings, message", [(dict(n_embd=16, n_head=3), "n_embd=16 is not divisible by n_head=3"),
                                               (dict(n_layer=0), "n_layer must be a positive integer, got 0")])
def test_a_config_built_directly_is_checked(settings, message):
    """Only from_dict checked: GPT(GPTConfig(n_embd=16, n_head=3)) built, then its first forward
    pass failed with a shape error."""
    with pytest.raises(ValueError, match=message):
        GPTConfig(**settings)


def test_forward_shapes_and_loss():
    m = tiny()
    idx = torch.randint(0, 97, (3, 10))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 10, 97)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near uniform at init
    assert m.lm_head.weight is m.transformer.wte.weight  # tied


def test_kv_cache_logits_equal_full_recompute_with_ragged_rows():
    """Rows of different lengths, right-padded, prefilled together, then decoded one token a step."""
    m = tiny()
    lens = [5, 9, 7]
    seqs = [torch.randint(0, 97, (30,)) for _ in lens]
    full = [m(s[None])[0][0] for s in seqs]  # (30, V) each
    T = max(lens)
    idx = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lens):
        idx[i, :n] = seqs[i][:n]
    with torch.no_grad():
        m.setup_caches(3, 48)
        pos = torch.arange(T).expand(3, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril().expand(3, 1, T, T)
        logits = m.forward_cached(idx, pos, mask)
        for i, n in enumerate(lens):
            torch.testing.assert_close(logits[i, :n], full[i][:n], atol=1e-5, rtol=1e-5)
        m.setup_caches(3, 48)  # only each prompt's last position, as the engines prefill
        last = m.forward_cached(idx, pos, mask, logits_at=torch.tensor(lens) - 1)
        assert last.shape == (3, 97)
        for i, n in enumerate(lens):
            torch.testing.assert_close(last[i], full[i][n - 1], atol=1e-5, rtol=1e-5)
        positions = torch.tensor(lens)
        for _ in range(12):  # each row continues from its own length
            tok = torch.stack([seqs[i][p] for i, p in enumerate(positions.tolist())])[:, None]
            kv = int(positions.max()) + 1
            mask = (torch.arange(kv) <= positions[:, None])[:, None, None, :]
            step = m.forward_cached(tok, positions[:, None], mask)[:, 0]
            for i, p in enumerate(positions.tolist()):
                torch.testing.assert_close(step[i], full[i][p], atol=1e-5, rtol=1e-5)
            positions = positions + 1


def test_prefill_into_scattered_cache_rows_by_index():
    """Prompts prefilled together into cache rows given as indices (3 and 1 of 5) equal each
    prompt alone, and the rows then decode from there; other rows are left untouched."""
    m = tiny()
    prompts = [torch.randint(0, 97, (6,)), torch.randint(0, 97, (4,))]
    with torch.no_grad():
        m.setup_caches(5, 48)
        for c in m.caches:
            c.k.fill_(7.0)
        untouched = m.caches[0].k[[0, 2, 4]].clone()
        idx = torch.stack([prompts[0], torch.cat([prompts[1], torch.zeros(2, dtype=torch.long)])])
        pos = torch.stack([torch.arange(6), torch.tensor([0, 1, 2, 3, 47, 47])])  # padding -> last slot
        mask = (torch.arange(6) <= pos[..., None])[:, None]
        logits = m.forward_cached(idx, pos, mask, rows=torch.tensor([3, 1]))
        assert torch.equal(m.caches[0].k[[0, 2, 4]], untouched)
        for i, (p, row) in enumerate(zip(prompts, (3, 1))):
            full = m(p[None])[0][0]
            torch.testing.assert_close(logits[i, :len(p)], full, atol=1e-5, rtol=1e-5)
            nxt = torch.randint(0, 97, (1, 1))
            n = len(p)
            step = m.forward_cached(nxt, torch.tensor([[n]]), (torch.arange(n + 1) <= n)[None, None, None],
                                    rows=slice(row, row + 1))[0, 0]
            torch.testing.assert_close(step, m(torch.cat([p, nxt[0]])[None])[0][0, -1], atol=1e-5, rtol=1e-5)


def test_decoding_without_a_mask_equals_an_all_true_mask():
    """Rows at one position may pass mask=None (nothing to mask; the cache is written by a
    strided copy instead of a scatter): the same logits and cache, bit for bit."""
    m = tiny()
    prompts = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        outs, caches = [], []
        for mask in ("all true", None):
            m.setup_caches(3, 48)
            m.forward_cached(prompts, torch.arange(9).expand(3, 9), torch.ones(9, 9, dtype=torch.bool).tril()[None, None])
            pos = torch.full((3, 1), 9)
            step_mask = torch.ones(3, 1, 1, 10, dtype=torch.bool) if mask else None
            outs.append(m.forward_cached(torch.tensor([[1], [2], [3]]), pos, step_mask))
            caches.append(torch.stack([torch.stack([c.k, c.v]) for c in m.caches]))
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(caches[0], caches[1]) and caches[1][:, :, :, :, 9].abs().sum() > 0  # position 9 written


def test_column_major_weights_change_only_the_layout(tmp_path):
    """The CPU engine stores linear weights as their transposes (faster products): the same
    parameters and values, the embedding still tied, logits as before, and a model dir saved
    from it loads."""
    from models.artifacts import load_model_dir, save_model_dir
    from models.engine import TextEngine
    from models.tokenizer import Tokenizer

    cfg = GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    params = dict(m.named_parameters())
    engine = TextEngine(m, Tokenizer.train(["the value of the object " * 20], 320), "cpu")
    assert engine.model is m and dict(m.named_parameters()) == params  # the same Parameter objects
    assert m.lm_head.weight is m.transformer.wte.weight
    for module in m.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.t().is_contiguous() and not module.weight.is_contiguous()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    idx, ref.vocab_in_use = torch.randint(0, 320, (3, 10)), m.vocab_in_use  # the ids the tokenizer names
    with torch.no_grad():
        torch.testing.assert_close(m(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)
    save_model_dir(tmp_path / "m", m.config.to_dict(), m.state_dict(), engine.tokenizer, {})
    loaded = load_model_dir(tmp_path / "m", lambda c: GPT(GPTConfig.from_dict(c)), family="gpt").model
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), ref.parameters()))


def test_hf_gpt2_import_matches_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=40, n_embd=48, n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = from_hf_gpt2(tmp_path).eval()
    idx = torch.randint(0, 120, (2, 17))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting, message", [
    (dict(tie_word_embeddings=False), "lm_head.weight is not the token embedding (wte.weight)"),
    (dict(activation_function="relu"), "activation_function='relu': this GPT computes 'gelu_new' or "
                                       "'gelu_pytorch_tanh' only"),
    (dict(layer_norm_epsilon=1e-2), "layer_norm_epsilon=0.01"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(n_inner=64), "n_inner=64"),
])
def test_hf_gpt2_settings_this_model_does_not_compute_are_refused(tmp_path, setting, message):
    """Each was ignored, and the imported model's logits silently differed from transformers'
    (an untied lm_head by 22.9; n_inner failed in an AssertionError)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=40, n_embd=48, n_layer=2, n_head=4, **setting))
    if not hf.config.tie_word_embeddings:
        torch.nn.init.normal_(hf.lm_head.weight)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        from_hf_gpt2(tmp_path)


def test_hf_gpt2_files_it_cannot_read_are_named(tmp_path):
    """Raw FileNotFoundError, KeyError or SafetensorError tracebacks named nothing useful."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=40, n_embd=48, n_layer=2, n_head=4)).save_pretrained(
        tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors: not a readable safetensors file"):
        from_hf_gpt2(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"model.safetensors: file is missing \(a \.bin checkpoint"):
        from_hf_gpt2(tmp_path)
    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 5}))
    with pytest.raises(ArtifactError, match="config.json: n_embd=48 is not divisible by n_head=5"):
        from_hf_gpt2(tmp_path)
    del config["n_head"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json: n_head is missing"):
        from_hf_gpt2(tmp_path)
