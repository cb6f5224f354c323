"""The offline tools (synthesize, evaluate, compare_generators, classifier_ascent) end a user's
mistake as the training jobs do: one line naming the option or file, exit status 2, no
traceback, before any slow work, and they never overwrite what they were not asked to."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifacts import save_model_dir
from models.image_engine import ImageEngine, ImageRequest
from models.sampling import MAX_SEED
from training import classifier_ascent, compare_generators, evaluate, synthesize, train_gan
from training.common import run_cli
from training.evaluate import Evaluator, EvaluatorConfig

from test_gan_train import one_thread  # noqa: F401 (autouse: tiny networks run faster on one thread)


@pytest.fixture(scope="module")
def gan(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, model folder) of a GAN trained for two steps: the tools only need its files."""
    run = tmp_path_factory.mktemp("gan") / "run"
    model = train_gan.main(["--preset", "tiny", f"--run_dir={run}", "--store=false", "--max_steps=2",
                            "--eval_interval=2", "--evaluator_steps=2", "--evaluator_n=64"])
    return run, model


def cli(module, argv: list[str], capsys) -> str:
    """Run a tool as its command does: it must end with exit status 2 and one `error: ` line
    (after argparse's usage, for an option argparse checks). → that line."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") or ": error: " in last, err
    return last


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


# ------------------------------------------------------------------------------ synthesize --out

def test_synthesize_refuses_a_folder_that_is_not_an_earlier_export(gan, tmp_path, prompts, capsys):
    """It overwrote the metadata.jsonl (and the images) of a user's own imagefolder, exit 0."""
    _, model = gan
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metadata.jsonl").write_text('{"file_name": "000000.png", "text": "my own"}\n')
    (mine / "000000.png").write_bytes(b"my image")
    err = cli(synthesize, [str(model), f"--out={mine}", "--prompts", str(prompts), "--device=cpu"], capsys)
    assert f"--out={mine}: holds files that are not an earlier export" in err
    assert "my own" in (mine / "metadata.jsonl").read_text() and (mine / "000000.png").read_bytes() == b"my image"


def test_synthesize_refuses_an_out_that_is_a_file_before_generating(gan, tmp_path, prompts, capsys,
                                                                     monkeypatch):
    """It generated every image, then failed with a FileExistsError traceback."""
    _, model = gan
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(synthesize, "synthesize", lambda *a, **k: pytest.fail("generated before refusing"))
    err = cli(synthesize, [str(model), f"--out={tmp_path / 'file'}", "--prompts", str(prompts), "--device=cpu"],
              capsys)
    assert f"--out={tmp_path / 'file'}: exists and is not a folder" in err


def test_synthesize_replaces_an_earlier_export(gan, tmp_path, prompts):
    """Running a command again replaces its export, leaving none of the longer one's images."""
    _, model = gan
    out = tmp_path / "synth"
    synthesize.main([str(model), f"--out={out}", "--n=3", "--cas_steps=0", "--device=cpu"])
    synthesize.main([str(model), f"--out={out}", "--prompts", str(prompts), "--device=cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl", "report.json"]
    assert json.loads((out / "report.json").read_text())["n"] == 2


def test_an_export_interrupted_during_cas_is_replaced_by_the_same_command(gan, tmp_path, monkeypatch):
    """A Ctrl-C during the CAS classifier's training left images but no report.json, and the
    same command was then refused: "holds files that are not an earlier export of synthesize"."""
    _, model = gan
    out = tmp_path / "synth"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(synthesize, "classification_accuracy_score", interrupted)
        with pytest.raises(KeyboardInterrupt):
            synthesize.main([str(model), f"--out={out}", "--n=3", "--device=cpu"])
    assert json.loads((out / "report.json").read_text())["finished"] is False
    report = synthesize.main([str(model), f"--out={out}", "--n=2", "--cas_steps=0", "--device=cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl", "report.json"]
    assert report["finished"] and json.loads((out / "report.json").read_text()) == report


@pytest.mark.parametrize("module", [evaluate, synthesize])
def test_a_store_tag_given_for_a_model_folder_says_how_to_find_the_folder(module, tmp_path, capsys):
    """`gan:latest` was told "gan:latest/config.json: file is missing"."""
    args = ["gan:latest"] + ([f"--out={tmp_path / 'out'}"] if module is synthesize else [])
    err = cli(module, args, capsys)
    assert "gan:latest: no such model folder: a store tag? give its folder, `bentoml models get gan:latest -o " \
           "path` prints it" in err
    err = cli(module, [str(tmp_path / "none")] + args[1:], capsys)
    assert err.endswith(f"{tmp_path / 'none'}: no such model folder")


# ------------------------------------------------------------------------------ evaluate --run

def test_evaluate_refuses_an_evaluator_of_another_image_size(gan, tmp_path, capsys):
    """A 64 px run's evaluator graded a 32 px model: a wrong FD went into its metrics.json."""
    _, model = gan
    save_model_dir(tmp_path / "run64" / "evaluator", {"family": "evaluator", **vars(EvaluatorConfig(64))},
                   Evaluator(EvaluatorConfig(64)).state_dict())
    metrics = (model / "metrics.json").read_text()
    err = cli(evaluate, [str(model), f"--run={tmp_path / 'run64'}", "--per_pair=1"], capsys)
    assert "its evaluator grades 64 px images, the model draws 32 px ones" in err
    assert (model / "metrics.json").read_text() == metrics


def test_evaluate_refuses_a_run_without_an_evaluator(gan, tmp_path, capsys, monkeypatch):
    """A mistyped --run quietly trained a new evaluator (minutes) instead of reusing the run's."""
    _, model = gan
    monkeypatch.setattr(evaluate, "train_evaluator", lambda *a, **k: pytest.fail("trained an evaluator"))
    err = cli(evaluate, [str(model), f"--run={tmp_path / 'typo'}", "--per_pair=1"], capsys)
    assert f"--run={tmp_path / 'typo'}: no evaluator/ there" in err


def test_evaluate_reuses_the_run_evaluator_and_updates_the_metrics(gan, tmp_path):
    run, model = gan
    copy = shutil.copytree(model, tmp_path / "model")
    metrics = evaluate.main([str(copy), f"--run={run}", "--per_pair=1"])
    saved = json.loads((copy / "metrics.json").read_text())
    assert saved["fd"] == metrics["fd"] and "evaluator" in saved  # merged into the job's metrics


# ------------------------------------------------------------------- a mistake is one line, not a traceback

@pytest.mark.parametrize("per_pair", ["0", "-2"])
def test_evaluate_refuses_a_per_pair_below_one(gan, per_pair, capsys):
    """It ended in `ValueError: need at least one array to stack`."""
    run, model = gan
    assert f"--per_pair={per_pair}: must be >= 1" in cli(evaluate, [str(model), f"--run={run}",
                                                                    f"--per_pair={per_pair}"], capsys)


@pytest.fixture
def no_training(monkeypatch):
    """An evaluator trained before a mistake is refused fails the test at once (30 s otherwise)."""
    for module in (classifier_ascent, compare_generators):
        monkeypatch.setattr(module, "load_or_train_evaluator", lambda *a, **k: pytest.fail("trained first"))


@pytest.mark.parametrize("module", [compare_generators, classifier_ascent])
def test_comparison_tools_refuse_a_per_pair_below_one_before_any_work(module, tmp_path, capsys, no_training):
    """compare_generators failed in a traceback, classifier_ascent after 30 s of training."""
    err = cli(module, ["--per_pair=0", f"--run={tmp_path / 'run'}", f"--out={tmp_path / 'out'}"], capsys)
    assert "--per_pair=0: must be >= 1" in err and not (tmp_path / "run").exists()


def test_compare_generators_names_a_missing_model_folder(tmp_path, capsys, monkeypatch):
    """The default paths (runs/gan/model, ...) without those runs: a FileNotFoundError traceback."""
    monkeypatch.chdir(tmp_path)
    err = cli(compare_generators, [], capsys)
    assert "--gan=runs/gan/model: runs/gan/model/config.json: file is missing (--gan='' leaves it out)" in err


def test_compare_generators_refuses_a_folder_of_another_family(gan, tmp_path, capsys):
    """A GPT model as --gan ended in `KeyError: 'data'`; an image model of another family is
    refused by its loader, naming its config.json."""
    _, model = gan
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"family": "gpt", "n_layer": 2}))
    err = cli(compare_generators, [f"--gan={tmp_path / 'gpt'}", "--ar=", "--ae=", "--vae=",
                                   f"--run={tmp_path / 'run'}"], capsys)
    assert f"--gan={tmp_path / 'gpt'}: holds a 'gpt' model; --gan takes a 'gan' model" in err
    err = cli(compare_generators, ["--gan=", f"--ar={model}", "--ae=", "--vae=", f"--run={tmp_path / 'run'}"],
              capsys)
    assert f"--ar={model}: holds a 'gan' model; --ar takes an 'ar_image' model" in err
    assert not (tmp_path / "run").exists()


def _image_model(folder, family: str, seed: int = 0, n_train: int = 512, **extra):
    folder.mkdir(parents=True)
    shapes = {"image_size": 32, "holdout": ""}
    (folder / "config.json").write_text(json.dumps({"family": family, **extra, "data": {
        "source": "shapes", "n_train": n_train, "seed": seed, "shapes": shapes}}))
    return folder


@pytest.mark.parametrize("option, family", [("ae", "gan"), ("vae", "ar_image"), ("gan", "autoencoder"),
                                            ("ar", "autoencoder")])
def test_compare_generators_names_the_option_given_another_image_family(option, family, tmp_path, capsys,
                                                                        no_training):
    """A GAN given as --ae was called 'a VAE; give it as --vae'; an autoencoder as --gan failed
    in the loader without naming the option."""
    folder = _image_model(tmp_path / "model", family, variational=False)
    others = [f"--{o}=" for o in ("gan", "ar", "ae", "vae") if o != option]
    err = cli(compare_generators, [f"--{option}={folder}", *others, f"--run={tmp_path / 'run'}"], capsys)
    expected = compare_generators.FAMILIES[option]
    assert f"--{option}={folder}: holds a {family!r} model; --{option} takes a" in err and f"{expected!r} model" in err


@pytest.mark.parametrize("change", [{"seed": 5}, {"n_train": 256}])
def test_compare_generators_refuses_models_of_other_data_seeds_or_sizes(change, tmp_path, capsys, no_training):
    """An autoencoder of --data_seed=5 was graded for memorisation against the GAN's training set
    (seed 0): the check compared the shapes settings only, not the seed or the image count."""
    gan = _image_model(tmp_path / "gan", "gan")
    ae = _image_model(tmp_path / "ae", "autoencoder", variational=False, **{"seed": 0, "n_train": 512, **change})
    err = cli(compare_generators, [f"--gan={gan}", "--ar=", f"--ae={ae}", "--vae=", f"--run={tmp_path / 'run'}"],
              capsys)
    (key, value), = change.items()
    assert "the models were trained on different datasets" in err and f"{key}={value}" in err.split("--ae:")[1]


@pytest.mark.parametrize("option, variational", [("ae", True), ("vae", False)])
def test_compare_generators_refuses_an_autoencoder_given_as_the_other_kind(option, variational, tmp_path, capsys):
    """A VAE given as --ae (or the reverse) was compared under the wrong name, silently."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"family": "autoencoder", "variational": variational,
                                                    "data": {"source": "shapes"}}))
    others = [f"--{o}=" for o in ("gan", "ar", "ae", "vae") if o != option]
    err = cli(compare_generators, [f"--{option}={folder}", *others, f"--run={tmp_path / 'run'}"], capsys)
    assert f"--{option}={folder}: holds {'a VAE' if variational else 'a plain autoencoder'}; give it as --" in err


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device=cuda: no CUDA device is available here"),
    ("tpu", "argument --device: invalid choice: 'tpu'"),
])
def test_synthesize_refuses_a_device_it_cannot_use(gan, tmp_path, prompts, device, message, capsys,
                                                   monkeypatch):
    """An AssertionError (no CUDA), or torch's RuntimeError for a device name it does not know."""
    _, model = gan
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = cli(synthesize, [str(model), f"--out={tmp_path / 'out'}", "--prompts", str(prompts),
                           f"--device={device}"], capsys)
    assert message in err and not (tmp_path / "out").exists()


def test_synthesize_names_a_model_without_procedural_data(gan, tmp_path, capsys):
    """It ended with a bare message and exit status 1, not as the other mistakes do."""
    _, model = gan
    own = shutil.copytree(model, tmp_path / "own")
    config = json.loads((own / "config.json").read_text())
    (own / "config.json").write_text(json.dumps({**config, "data": {**config["data"], "shapes": None}}))
    err = cli(synthesize, [str(own), f"--out={tmp_path / 'out'}", "--device=cpu"], capsys)
    assert f"{own}: this model was not trained on the procedural data" in err and "pass --prompts" in err


@pytest.mark.parametrize("option", ["--out", "--run"])
def test_classifier_ascent_refuses_a_file_for_a_folder_before_training(option, tmp_path, capsys, no_training):
    """A FileExistsError traceback (--out), or a NotADirectoryError after training the evaluator (--run)."""
    (tmp_path / "file").write_text("x")
    folders = {"--out": tmp_path / "out", "--run": tmp_path / "run", option: tmp_path / "file"}
    err = cli(classifier_ascent, [f"{o}={p}" for o, p in folders.items()], capsys)
    assert f"{option}={tmp_path / 'file'}: exists and is not a folder" in err


# ------------------------------------------------------------------- the message names the option, at once

@pytest.mark.parametrize("batch", ["0", "128", "6"])
def test_compare_generators_checks_speed_batch_before_the_evaluation(gan, batch, tmp_path, capsys, no_training):
    """`n: must be an integer from 1 to 16`, after the whole evaluation (128); 6 timed 4 images."""
    _, model = gan
    err = cli(compare_generators, [f"--speed_batch={batch}", f"--gan={model}", "--ar=", "--ae=", "--vae=",
                                   f"--run={tmp_path / 'run'}"], capsys)
    assert f"--speed_batch={batch}: must be a multiple of 4 from 4 to 64" in err


@pytest.mark.parametrize("args, message", [
    (["--seed=-5", "--n=3"], "--seed=-5: must be from 0 to 4294967293 for 3 image(s)"),
    (["--seed=4294967295", "--prompts", "PROMPTS"], "--seed=4294967295: must be from 0 to 4294967294 for 2 image(s)"),
])
def test_synthesize_names_a_bad_seed(gan, tmp_path, prompts, args, message, capsys):
    """numpy's `expected non-negative integer`, or a prompt's line blamed for the seed."""
    _, model = gan
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    err = cli(synthesize, [str(model), f"--out={tmp_path / 'out'}", "--device=cpu", *args], capsys)
    assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", [classifier_ascent, compare_generators])
def test_comparison_tools_name_a_negative_seed(module, tmp_path, capsys, no_training):
    """numpy's `expected non-negative integer`, after training the evaluator."""
    assert "--seed=-1: must be in [0, 4294967295]" in cli(module, ["--seed=-1", f"--run={tmp_path / 'run'}"], capsys)


# ------------------------------------------------------------------- nonsense is refused, not run

def test_synthesize_refuses_negative_cas_steps(gan, tmp_path, capsys):
    """It reported a CAS score from a classifier that was never trained."""
    _, model = gan
    err = cli(synthesize, [str(model), f"--out={tmp_path / 'out'}", "--n=2", "--cas_steps", "-3"], capsys)
    assert "--cas_steps=-3: must be >= 0" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module, arg, message", [
    (classifier_ascent, "--steps=-1", "--steps=-1: must be >= 1"),
    (classifier_ascent, "--step_size=nan", "--step_size=nan: must be > 0"),
    (classifier_ascent, "--eps=-5", "--eps=-5.0: must be > 0"),
    (compare_generators, "--threads=-2", "--threads=-2: must be >= 0"),
])
def test_comparison_tools_refuse_nonsense_settings(module, arg, message, tmp_path, capsys, no_training):
    assert message in cli(module, [arg, f"--run={tmp_path / 'run'}", f"--out={tmp_path / 'out'}"], capsys)


def test_compare_generators_table_names_the_batch_it_timed():
    """The table's header said "batch 64" whatever --speed_batch was."""
    m = {"train_accuracy": {"colour": 1.0, "shape": 1.0}, "train_all_attributes": 1.0, "coverage": 1.0, "fd": 0.0,
         "memorisation": 0.0, "unnatural_rate": 0.0, "evaluations_per_image": 1, "images_per_s": 9.0}
    assert "images/s (batch 32, CPU)" in compare_generators.markdown({"gan": m}, "", speed_batch=32)


def test_evaluation_seeds_near_the_top_of_the_range_work(gan):
    """--seed takes [0, 2**32); evaluate_generator gives prompt k the seeds from seed + 1000·k,
    which near the top were refused by the engine after the evaluator's training (a late
    traceback in compare_generators and classifier_ascent). They wrap instead; small seeds keep
    their images."""
    engine = ImageEngine.load(gan[1], device="cpu")
    prompts = ["a red circle", "a blue square", "a green cross"]
    top = evaluate.generate_for(engine, prompts, n=2, seed=MAX_SEED - 1000)
    wrapped = [MAX_SEED - 1000, 0, 1000]  # prompt k: seed + 1000·k, wrapped below 2**32 - 1 for n=2
    same = engine.generate([ImageRequest(p, seed=s, n=2) for p, s in zip(prompts, wrapped)])
    assert torch.equal(top.permute(0, 2, 3, 1), torch.from_numpy(np.concatenate(same)))
    low = evaluate.generate_for(engine, prompts, n=2, seed=7)  # small seeds: as before
    same = engine.generate([ImageRequest(p, seed=7 + 1000 * k, n=2) for k, p in enumerate(prompts)])
    assert torch.equal(low.permute(0, 2, 3, 1), torch.from_numpy(np.concatenate(same)))
