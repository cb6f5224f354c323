"""The GPT training job on tiny configs: loss falls, resume is exact, DDP runs, the store gets the model."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tokenizer import Tokenizer
from tests_support import deny_reading
from training.data.text_corpus import Corpus, load_corpus
from training.train_gpt import main, sample_prompts

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--store=false", "--max_steps=20", "--ckpt_interval=5", "--eval_interval=10"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_tiny_training_lowers_the_loss(tmp_path):
    metrics = main(["--preset", "tiny", "--store=false", f"--run_dir={tmp_path}", f"--out={tmp_path / 'out'}"])
    history = torch.load(tmp_path / "ckpt.pt", weights_only=True)["history"]
    first, last = sum(history["train_loss"][:5]) / 5, sum(history["train_loss"][-5:]) / 5
    assert last < first - 0.3
    assert metrics["val_bits_per_byte"] > 0 and (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "samples.txt").read_text().strip()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    main(TINY + [f"--run_dir={tmp_path / 'straight'}"])
    main(TINY + [f"--run_dir={tmp_path / 'halted'}", "--halt_after=12"])
    assert not (tmp_path / "halted" / "model").exists()  # stopped before the end
    err = capsys.readouterr().err
    assert "halted at step 12 of 20;" in err  # it said nothing
    assert re.search(r"data: \d+ documents for training \([\d,]+ tokens\), \d+ for validation", err)
    assert torch.load(tmp_path / "halted" / "ckpt.pt", weights_only=True)["step"] == 12
    # Another run's tokenizer in the folder (a run started there without --resume and stopped)
    # must not be paired with these weights: the checkpoint carries its own.
    (tmp_path / "halted" / "tokenizer.json").write_text(Tokenizer.train(["other text " * 50], 300).to_str())
    main(TINY + [f"--run_dir={tmp_path / 'halted'}", "--resume=true"])
    assert f"resumed from {tmp_path / 'halted' / 'ckpt.pt'} at step 12" in capsys.readouterr().err  # it said nothing
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "halted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_ddp_with_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.train_gpt", *TINY, f"--run_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]  # the workers' traceback, if any
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["val_loss"] < 7


def test_saves_to_the_bentoml_store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "store"))
    code = ("from training.train_gpt import main; import bentoml; "
            "m = main(['--preset', 'tiny', '--max_steps=5', '--run_dir=" + str(tmp_path / "run") + "']); "
            "b = bentoml.models.get(m['tag']); print(b.info.labels['family'], b.info.labels['dataset'] == "
            "m['dataset_hash'], sorted(p.name for p in __import__('pathlib').Path(b.path).iterdir()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "gpt True" in out and "model.safetensors" in out and "tokenizer.json" in out and "metrics.json" in out


@pytest.mark.parametrize("flag", ["--n_layer=abc", "--no_such_flag=1", "--preset=huge"])
def test_bad_flags_exit_with_a_usage_error(flag):
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 2


@pytest.mark.parametrize("flag,named", [
    ("--max_steps=0", "--max_steps=0: must be >= 1"), ("--batch_size=0", "--batch_size"),
    ("--eval_interval=0", "--eval_interval"), ("--grad_accum=0", "--grad_accum"), ("--lr=-1", "--lr"),
    ("--dropout=2", "--dropout"), ("--vocab_size=10", "--vocab_size"), ("--block_size=0", "--block_size"),
    ("--device=foo", "--device"), ("--n_head=3", "--n_embd=32 is not divisible by --n_head=3"),
    ("--name=My Model", "--name"),
])
def test_bad_settings_are_refused_before_training_naming_the_option(tmp_path, capsys, flag, named):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", f"--run_dir={tmp_path}", flag])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_an_out_path_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        main(TINY + [f"--run_dir={tmp_path / 'run'}", f"--out={tmp_path / 'afile'}"])
    assert "--out" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_resume_needs_a_matching_readable_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true"])  # a mistyped run_dir does not start afresh
    main(TINY + [f"--run_dir={tmp_path}", "--halt_after=5"])
    with pytest.raises(ValueError, match="n_layer=2, this run asks for n_layer=3"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true", "--n_layer=3"])
    ckpt = tmp_path / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{ckpt} is not a readable checkpoint \\(corrupt, cut short"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true"])  # (torch: "OSError: [Errno 22] ...")


def test_a_diverging_run_stops_and_saves_no_model(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        main(TINY + [f"--run_dir={tmp_path}", "--lr=1e6", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


def test_too_little_text_is_named_and_leaves_the_run_dir_as_it_was(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_text("another run's tokenizer")
    with pytest.raises(ValueError, match="block_size"):
        main(TINY + [f"--run_dir={tmp_path / 'run'}", f"--data={tmp_path / 'tiny.txt'}"])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer.json"]
    assert (tmp_path / "run" / "tokenizer.json").read_text() == "another run's tokenizer"
    with pytest.raises(ValueError, match="block_size"):
        main(TINY + [f"--run_dir={tmp_path / 'new'}", f"--data={tmp_path / 'tiny.txt'}"])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("block_size", [2, 8])
def test_a_short_context_still_writes_samples_and_saves_the_model(tmp_path, block_size):
    main(["--preset", "tiny", "--store=false", "--max_steps=2", f"--block_size={block_size}", f"--run_dir={tmp_path}"])
    assert (tmp_path / "samples.txt").read_text().count("###") == 4
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_resuming_at_or_past_max_steps_saves_the_checkpoints_model(tmp_path, capsys):
    main(TINY + [f"--run_dir={tmp_path}", "--halt_after=6"])  # no validation at step 6 (every 10)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for max_steps in (6, 3):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true", f"--max_steps={max_steps}"])
        assert "nothing to train" in capsys.readouterr().err
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert metrics["steps"] == 6 and metrics["val_loss"] > 0
        saved = weights(tmp_path)
        assert all(torch.equal(saved[k], v) for k, v in ckpt["model"].items())
        (tmp_path / "model" / "model.safetensors").unlink()


def test_a_run_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(TINY + [f"--run_dir={tmp_path / 'afile'}"])
    assert e.value.code == 2 and "--run_dir" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(TINY + [f"--run_dir={tmp_path / 'run'}", "--device=cuda"])
    assert e.value.code == 2 and "--device=cuda: no CUDA" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_user_errors_on_the_command_line_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "training.train_gpt", *TINY, f"--run_dir={tmp_path}",
           f"--data={tmp_path / 'missing.txt'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: --data: {tmp_path / 'missing.txt'} does not exist"


def test_data_that_is_neither_file_nor_folder_is_named_as_such(tmp_path):
    """A FIFO (or a device) given as --data was said not to exist."""
    from training.data.text_corpus import load_corpus

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"--data: .*pipe is neither a file nor a folder"):
        load_corpus(str(tmp_path / "pipe"))


@pytest.mark.parametrize("data", ["{f},", ",{f}", "{f},,{f}"])
def test_an_empty_data_entry_is_refused(tmp_path, monkeypatch, data):
    (tmp_path / "small.txt").write_text("some text " * 50)
    monkeypatch.chdir(tmp_path)  # Path("") is "." : it would read every .txt here
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(data.format(f=tmp_path / "small.txt"))


def test_the_dataset_hash_covers_document_boundaries():
    assert Corpus(["ab", "c"], ["v"]).hash != Corpus(["a", "bc"], ["v"]).hash
    assert Corpus(["a"], ["b", "c"]).hash != Corpus(["a", "b"], ["c"]).hash
    assert Corpus(["ab", "c"], ["v"]).hash == Corpus(["ab", "c"], ["v"]).hash


def test_user_text_must_be_utf8_and_the_split_ignores_how_the_path_is_spelled(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub.txt").mkdir(parents=True)  # a folder named like a text file is not one
    for i in range(30):
        (data / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    monkeypatch.chdir(tmp_path)
    assert load_corpus("data").hash == load_corpus(str(data)).hash == load_corpus(f"../{tmp_path.name}/data").hash
    (data / "latin1.txt").write_bytes("Café naïve".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        load_corpus(str(data))


def test_jsonl_lines_are_documents_beside_text_files(tmp_path):
    """Hugging Face's text datasets come as JSON lines, `{"text": ...}`: each line a document
    (split by its name, file:line), other fields ignored, blank lines and empty texts skipped."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("a plain text document " * 10)
    rows = [{"text": f"line document {i} " * 10, "id": i} for i in range(200)] + [{"text": ""}]
    (data / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]) + "\n\n"
                                     + "\n".join(json.dumps(r) for r in rows[20:]) + "\n")
    corpus = load_corpus(str(data))
    docs = sorted(corpus.train + corpus.val)
    assert docs == sorted([(data / "notes.txt").read_text()] + [r["text"] for r in rows[:200]])
    assert corpus.val and corpus.train and not corpus.by_characters  # split by line: 5 % of 201 documents
    for bad, why in (("not json", "rows.jsonl:2 is not JSON"), ('{"content": "x"}', 'rows.jsonl:2 is not an object'),
                     ('["text"]', 'rows.jsonl:2 is not an object'), ('{"text": 5}', 'rows.jsonl:2 is not an object')):
        (data / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=why):
            load_corpus(str(data))


@pytest.mark.parametrize("name", ["rows.json", "rows.CSV", "rows.tsv"])
def test_a_structured_file_named_directly_is_refused_not_trained_on_as_text(tmp_path, name):
    """`--data=ds.json` (Hugging Face's `to_json("ds.json")` writes JSON lines into it) or a CSV
    was trained on as plain text, braces, keys and commas included, exit 0. Any other file named
    directly is text (notes.md, a README), as before."""
    (tmp_path / name).write_text('{"text": "a line document"}\n' * 40)
    kind = name.split(".")[1].lower()
    with pytest.raises(ValueError, match=rf"--data: {re.escape(str(tmp_path / name))} is a {kind} file: give JSON "
                                         rf"lines of {{\"text\": …}} as \.jsonl, or rename it to \.txt"):
        load_corpus(str(tmp_path / name))
    (tmp_path / "notes.md").write_text("plain notes " * 40)
    assert load_corpus(str(tmp_path / "notes.md")).train


def test_a_utf8_byte_order_mark_is_not_training_text(tmp_path):
    (tmp_path / "bom.txt").write_text("text from an editor that writes a byte-order mark " * 4, encoding="utf-8-sig")
    corpus = load_corpus(str(tmp_path / "bom.txt"))
    assert corpus.train[0].startswith("text from") and not any("\ufeff" in doc for doc in corpus.train + corpus.val)


def test_resume_refuses_other_data(tmp_path):
    """The checkpoint's tokenizer was fitted to its data, and the model's `dataset` label names one
    dataset: a resume on other data is refused, naming both."""
    main(TINY + [f"--run_dir={tmp_path}", "--halt_after=5"])
    other = tmp_path / "other.txt"
    other.write_text("some other text " * 100)
    resume = TINY + [f"--run_dir={tmp_path}", "--resume=true", f"--data={other}"]
    with pytest.raises(ValueError, match=rf"ckpt.pt was trained on dataset \w+ \(--data=''\), this run's is dataset "
                                         rf"\w+ \(--data='{re.escape(str(other))}'\): resume with the same data, or "
                                         rf"start a new --run_dir"):
        main(resume)
    with pytest.raises(ValueError, match=r"\(--data=''\); --max_chars=200000 then, 100000 now: resume with"):
        main(TINY + [f"--run_dir={tmp_path}", "--resume=true", "--max_chars=100000"])  # the same --data twice told nothing
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["dataset"]  # a checkpoint from before the hash: its --data decides
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="trained with data='', this run asks for data="):
        main(resume)


def test_no_document_is_dropped_when_all_hash_into_validation(tmp_path):
    """doc16.txt and doc17.txt both fall in the validation bucket: the text's tail is held out."""
    for name in ("doc16.txt", "doc17.txt"):
        (tmp_path / name).write_text(f"the text of {name} " * 50)
    corpus = load_corpus(str(tmp_path))
    assert corpus.by_characters and len(corpus.train) == 2 and len(corpus.val) == 1
    assert "".join(corpus.train + corpus.val) == "".join((tmp_path / n).read_text() for n in ("doc16.txt", "doc17.txt"))


def test_a_folder_is_read_as_the_user_sees_it(tmp_path):
    """Linked subfolders are followed (rglob skipped them in silence; a link to a parent does not
    loop), hidden folders are not (a .venv's licence texts, .ipynb_checkpoints), extensions are
    matched whatever their case (UPPER.TXT was left out, ROWS.JSONL read as raw text), a file
    name that is not UTF-8 is split like any other (it ended in "surrogates not allowed"), and
    JSON lines are split at newlines only (U+2028 in a text, which JSON allows, broke its line)."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / ".venv").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "linked.txt").write_text("a linked document " * 10)
    (data / "shared").symlink_to(elsewhere, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    (data / ".venv" / "LICENSE.txt").write_text("hidden licence " * 10)
    (data / "UPPER.TXT").write_text("an upper-case extension " * 10)
    (data / "ROWS.JSONL").write_text(json.dumps({"text": "a json\u2028line"}, ensure_ascii=False) + "\n")
    (data / os.fsdecode(b"caf\xe9.txt")).write_text("a latin-1 file name " * 10)
    corpus = load_corpus(str(data), val_fraction=0)  # every document whole, in train
    docs = sorted(corpus.train + corpus.val)
    assert docs == sorted(["a linked document " * 10, "an upper-case extension " * 10, "a json\u2028line",
                           "a latin-1 file name " * 10])


def test_unreadable_or_utf16_text_is_named_with_its_remedy(tmp_path, monkeypatch):
    """A file this user may not read ended in a PermissionError traceback; a UTF-16 file was
    told to convert from latin1."""
    (tmp_path / "wide.txt").write_text("a UTF-16 text", encoding="utf-16")
    with pytest.raises(ValueError, match="wide.txt is not UTF-8 text .*iconv -f utf-16 -t utf-8"):
        load_corpus(str(tmp_path / "wide.txt"))
    (tmp_path / "secret.txt").write_text("not for you")
    deny_reading(monkeypatch, "secret.txt")
    with pytest.raises(ValueError, match=r"secret.txt cannot be read \(Permission denied\)"):
        load_corpus(str(tmp_path / "secret.txt"))


def test_nul_bytes_and_unmarked_utf16_are_refused_as_not_text(tmp_path):
    """Zeros, and UTF-16 text without a byte-order mark, are valid UTF-8 and were trained on. A
    stray NUL far into a text is kept (git's test: a NUL in the first 8,000 bytes)."""
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 20000)
    (tmp_path / "wide.txt").write_text("an unmarked UTF-16 text " * 50, encoding="utf-16-le")
    (tmp_path / "big-endian.txt").write_text("an unmarked UTF-16 text " * 50, encoding="utf-16-be")
    for name, at, order in (("zeros.txt", 0, "be"), ("wide.txt", 1, "le"), ("big-endian.txt", 0, "be")):
        with pytest.raises(ValueError, match=rf"{name} holds a NUL character \(at character {at}\): not text;"
                                             rf".*iconv -f utf-16{order} -t utf-8"):
            load_corpus(str(tmp_path / name))
    (tmp_path / "stray.txt").write_text("a long text " * 1000 + "\0 and more")
    corpus = load_corpus(str(tmp_path / "stray.txt"))
    assert any("\0" in text for text in corpus.train + corpus.val)


def test_max_chars_and_a_small_vocabulary_are_reported(tmp_path, capsys):
    """--preset tiny reads the first 200,000 characters only, and said nothing about it; nor did
    a text too small for --vocab_size's merges (an upper bound)."""
    (tmp_path / "big.txt").write_text("word " * 8000)
    assert load_corpus(str(tmp_path / "big.txt"), max_chars=30000).left_out == 10000
    main(TINY + [f"--run_dir={tmp_path / 'run'}", f"--data={tmp_path / 'big.txt'}", "--max_chars=30000",
                 "--max_steps=1"])
    err = capsys.readouterr().err
    assert "--max_chars=30,000 left out 10,000 characters" in err
    assert re.search(r"data: 1 document for training .*; the tokenizer has 2\d\d tokens \(this text has no more "
                     r"merges for --vocab_size=512\)", err)


def test_a_few_unequal_documents_hold_out_the_texts_last_5_percent(tmp_path):
    """Whole documents could not make 5 % of two files of 3 KB and 300 KB: the hash had sent
    the 300 KB one to validation, leaving 3 KB to train on. The text's tail is held out instead."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "aa_notes.txt").write_text("short notes " * 250)
    (data / "zz_book.txt").write_text("a long book " * 25_000)
    corpus = load_corpus(str(data))
    total = 250 * 12 + 25_000 * 12
    assert corpus.by_characters and len(corpus.train) == 2 and len(corpus.val) == 1
    assert sum(map(len, corpus.val)) == total - int(total * 0.95)
    assert "".join(corpus.train + corpus.val) == (data / "aa_notes.txt").read_text() + (data / "zz_book.txt").read_text()
    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):
        (many / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    corpus = load_corpus(str(many))
    assert not corpus.by_characters and len(corpus.train) + len(corpus.val) == 200  # whole documents


def test_own_text_is_sampled_from_its_own_beginnings_and_bits_per_byte_are_said(tmp_path, capsys):
    """samples.txt had prompted a model of the user's text with the Python docs' "This module "."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"ticket{i:02}.txt").write_text(f"Customer {i} writes: my order number {i} has not arrived. " * 8)
    main(TINY + ["--max_steps=2", f"--run_dir={tmp_path / 'run'}", f"--data={data}"])
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.count("### 'Customer ") == 4 and "This module" not in samples
    assert re.search(r"validation: loss \d+\.\d{4}, \d+\.\d{3} bits per byte", capsys.readouterr().err)
    assert sample_prompts("mine", ["句" * 120_000 + " two"]) == ["句" * 40 + " "]  # the job had failed there


def test_a_refused_resume_on_the_same_data_names_the_split_rule_for_text_only(tmp_path):
    from training.common import check_resume_data

    ckpt = {"dataset": "old", "config": {"data": "mine"}}
    for cause, said in (("", "the files changed since: resume"), ("how they are split", "or how they are split")):
        with pytest.raises(ValueError, match=said):
            check_resume_data(ckpt, tmp_path / "ckpt.pt", {"data": "mine"}, "new", ("data",), other_cause=cause)
