"""Model directories: round trip, and every kind of bad file fails with a message naming it."""
import json
from dataclasses import asdict

import pytest
import torch

from models.ar_image import ARImageConfig, ARImageEngine
from models.artifacts import ArtifactError, load_model_dir, save_model_dir
from models.engine import TextEngine, TextRequests
from models.gan import GANConfig
from models.gpt import GPT, GPTConfig
from models.image_engine import ImageEngine
from models.tokenizer import Tokenizer


@pytest.fixture()
def model_dir(tmp_path):
    tok = Tokenizer.train(["some text for a tokenizer " * 30], 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_model_dir(tmp_path / "m", model.config.to_dict(), model.state_dict(), tok, {"val_loss": 1.0})
    return tmp_path / "m", model


def test_round_trip(model_dir):
    path, model = model_dir
    engine = TextEngine.load(path, device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[k], v)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metrics.json", "model.safetensors",
                                                      "tokenizer.json"]


def expect_error(path, filename):
    with pytest.raises(ArtifactError) as e:
        TextEngine.load(path, device="cpu")
    assert filename in str(e.value)


def test_the_weights_are_as_readable_as_the_other_files(model_dir):
    """safetensors' save_file made model.safetensors 0600 (the other files 0644 under the usual
    umask), and the store's copy kept it: a server running as another user could not read it."""
    d, _ = model_dir
    assert (d / "model.safetensors").stat().st_mode & 0o777 == (d / "config.json").stat().st_mode & 0o777


def test_corrupt_weights(model_dir):
    path, _ = model_dir
    (path / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    expect_error(path, "model.safetensors")


def test_truncated_weights(model_dir):
    path, _ = model_dir
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(path, "model.safetensors")


def test_tied_tensors_that_differ_in_the_file_are_refused(model_dir):
    """The GPT ties lm_head to the token embedding: a file whose two copies differed loaded
    silently, the head's values replacing the embedding's."""
    from safetensors.torch import load_file, save_file

    path, _ = model_dir
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = torch.randn_like(tensors["lm_head.weight"])
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ArtifactError, match="model.safetensors: lm_head.weight and transformer.wte.weight are one "
                                            "tensor in the model, and differ in the file"):
        TextEngine.load(path, device="cpu")


def test_weights_that_are_not_finite_are_refused(model_dir):
    """Training never saves NaN or infinite weights; a file holding some served garbage."""
    from safetensors.torch import load_file, save_file

    path, _ = model_dir
    tensors = load_file(str(path / "model.safetensors"))
    tensors["transformer.h.0.mlp.c_fc.bias"][3] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"model.safetensors: transformer.h.0.mlp.c_fc.bias holds 1 value that "
                                            r"is not finite \(NaN or infinite\)"):
        TextEngine.load(path, device="cpu")


def test_config_that_does_not_match_the_weights(model_dir):
    path, _ = model_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_embd"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    expect_error(path, "model.safetensors")


def test_invalid_config_json(model_dir):
    path, _ = model_dir
    (path / "config.json").write_text("{nope")
    expect_error(path, "config.json")


def test_missing_tokenizer(model_dir):
    path, _ = model_dir
    (path / "tokenizer.json").unlink()
    expect_error(path, "tokenizer.json")


def test_garbled_tokenizer(model_dir):
    path, _ = model_dir
    (path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    expect_error(path, "tokenizer.json")


@pytest.mark.parametrize("key, value", [("n_embd", -32), ("n_head", 0), ("n_layer", "two")])
def test_config_values_the_model_cannot_be_built_from(model_dir, key, value):
    """Whatever torch raises on a bad value (RuntimeError, ZeroDivisionError, ...), the error
    names config.json."""
    path, _ = model_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    expect_error(path, "config.json")


@pytest.mark.parametrize("key, value", [("text_heads", 3), ("g_ch", 0)])
def test_gan_config_values_the_model_cannot_be_built_from(tmp_path, key, value):
    config = {"family": "gan", **GANConfig(g_ch=8, d_ch=8, text_dim=32).to_dict(), key: value}
    save_model_dir(tmp_path, config, {"unused": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="config.json: does not describe a valid model"):
        ImageEngine.load(tmp_path, device="cpu")


def edit_config(path, key, value):
    """Set config.json's `key` to `value`, or remove it when value is ...."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop(key) if value is ... else cfg.update({key: value})
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("value", ["512", None, ..., 1.5])
def test_a_vocab_size_that_is_not_an_integer_names_config_json(model_dir, value):
    path, _ = model_dir
    edit_config(path, "vocab_size", value)
    with pytest.raises(ArtifactError, match="config.json: .*vocab_size"):
        TextRequests.load(path)


@pytest.mark.parametrize("key, value", [("n_head", ...), ("n_head", -1), ("n_layer", True), ("block_size", 32.0),
                                        ("bias", "yes"), ("bias", ...), ("dropout", 1.0), ("dropout", ...)])
def test_required_config_fields_are_present_and_valid(model_dir, key, value):
    """A missing n_head would take the default, which the weights' shapes do not reveal."""
    path, _ = model_dir
    edit_config(path, key, value)
    with pytest.raises(ArtifactError, match=f"config.json: .*{key}"):
        TextEngine.load(path, device="cpu")
    with pytest.raises(ArtifactError, match=f"config.json: .*{key}"):  # the server's request checker too
        TextRequests.load(path)


def test_gan_size_fields_are_required(tmp_path):
    config = {"family": "gan", **GANConfig(g_ch=8, d_ch=8, text_dim=32).to_dict()}
    del config["text_heads"]
    save_model_dir(tmp_path, config, {"unused": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="config.json: .*text_heads is missing"):
        ImageEngine.load(tmp_path, device="cpu")


@pytest.mark.parametrize("key, value", [("n_head", ...), ("patch", 0), ("codebook", "64")])
def test_ar_image_size_fields_are_required(tmp_path, key, value):
    config = {"family": "ar_image", **asdict(ARImageConfig(n_embd=32, text_dim=32))}
    config.pop(key) if value is ... else config.update({key: value})
    save_model_dir(tmp_path, config, {"unused": torch.zeros(1)})
    with pytest.raises(ArtifactError, match=f"config.json: .*{key}"):
        ARImageEngine.load(tmp_path, device="cpu")


def test_the_weights_header_is_checked_before_the_model_is_built(model_dir):
    path, _ = model_dir
    edit_config(path, "n_layer", 3)
    devices = []

    def build(config):
        model = GPT(GPTConfig.from_dict(config))
        devices.append(model.lm_head.weight.device.type)
        return model

    with pytest.raises(ArtifactError, match="model.safetensors: tensors do not match the config"):
        load_model_dir(path, build, "gpt")
    assert devices == ["meta"]


def test_a_config_of_a_huge_model_fails_at_once(model_dir):
    """10**12 layers: even on the meta device the modules would never all be built."""
    path, _ = model_dir
    edit_config(path, "n_layer", 10**12)
    expect_error(path, "model.safetensors: holds 17 tensors")
