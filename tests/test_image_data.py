"""The image datasets: procedural shapes (determinism, captions that match pixels, held-out
pairs) and the imagefolder loader (bad files are skipped and counted, never fatal)."""
import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests_support import deny_reading
from training.data.imagefolder import load_imagefolder, to_rgb, write_imagefolder
from training.data.shapes import (ATTRIBUTES, COLOURS, DEFAULT_HOLDOUT, SYNONYMS, ShapesConfig,
                                  attribute_labels, make_shapes, negative_attributes,
                                  parse_holdout)


def test_shapes_are_deterministic():
    a, b = make_shapes(64, seed=3), make_shapes(64, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.digest() == b.digest()
    c = make_shapes(64, seed=4)
    assert not torch.equal(a.images, c.images) and a.digest() != c.digest()
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8
    assert make_shapes(4, seed=3, cfg=ShapesConfig(image_size=64)).images.shape == (4, 3, 64, 64)


def _mentions(caption: str, value: str) -> bool:
    return any(s in caption for s in SYNONYMS.get(value, (value,)))


def test_captions_name_the_attributes():
    data = make_shapes(300, seed=5, cfg=ShapesConfig(partial_caption_prob=0.0))
    for text, attrs in zip(data.captions, data.attributes):
        for key in ("shape", "colour", "size", "position", "background"):
            assert _mentions(text, attrs[key]), (text, key, attrs[key])
    assert len(set(data.captions)) > 250  # templates and synonyms vary


@pytest.mark.parametrize("size", [32, 64])
def test_pixels_agree_with_attributes(size):
    """The object's colour is where the position says, and large objects are larger."""
    data = make_shapes(200, seed=6, cfg=ShapesConfig(image_size=size))
    img = data.images.permute(0, 2, 3, 1).float()                               # (N, S, S, 3)
    areas: dict[tuple[str, str], list[float]] = {}
    for i, attrs in enumerate(data.attributes):
        target = torch.tensor(COLOURS[attrs["colour"]], dtype=torch.float32)
        inside = (img[i] - target).abs().max(-1).values < 30                     # (S, S)
        assert inside.sum() >= 0.02 * size * size, attrs
        ys, xs = torch.nonzero(inside, as_tuple=True)
        cx, cy = xs.float().mean() / size, ys.float().mean() / size
        expect = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                  "centre": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}[attrs["position"]]
        assert expect, (attrs, float(cx), float(cy))
        areas.setdefault((attrs["shape"], attrs["size"]), []).append(float(inside.float().mean()))
    for shape in ("circle", "square", "triangle", "cross"):
        assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape


def test_holdout_pairs_never_in_training():
    cfg = ShapesConfig(holdout="red:circle,blue:square")
    held = parse_holdout(cfg.holdout)
    train = make_shapes(500, seed=7, cfg=cfg)
    assert not any((a["colour"], a["shape"]) in held for a in train.attributes)
    full = make_shapes(500, seed=7, cfg=cfg, exclude_holdout=False)
    assert any((a["colour"], a["shape"]) in held for a in full.attributes)
    with pytest.raises(ValueError):
        parse_holdout("pink:circle")


def test_two_object_scenes():
    data = make_shapes(100, seed=8, cfg=ShapesConfig(two_object_prob=1.0))
    for text, a in zip(data.captions, data.attributes):
        assert a["n_objects"] == 2 and a["position"] != a["position2"]
        assert _mentions(text, a["colour2"]) and _mentions(text, a["shape2"]) and " and " in text
    assert attribute_labels(data.attributes).shape == (100, 5)


@pytest.mark.parametrize("data", ["", " "])
def test_an_empty_data_option_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch, data):
    """The image jobs' `--data=` read the current folder ("./metadata.jsonl: no metadata.jsonl");
    train_gpt refuses an empty entry the same way."""
    monkeypatch.chdir(tmp_path)
    write_imagefolder(tmp_path, [np.zeros((32, 32, 3), np.uint8)] * 2, ["a red circle"] * 2)
    with pytest.raises(ValueError, match="--data is empty: give 'shapes'"):
        load_imagefolder(data)


def test_imagefolder_skips_corrupt_and_missing_files(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(40, 20), (64, 64), (17, 33)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}", "shape": "circle"})
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    rows.append({"file_name": "corrupt.png", "text": "broken"})
    rows.append({"file_name": "missing.png", "text": "gone"})
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(tmp_path, image_size=32)
    assert data.images.shape == (3, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.captions == ["picture 0", "picture 1", "picture 2"]
    assert "skipped 3" in caplog.text and "1 missing (missing.png)" in caplog.text
    assert "1 unreadable (corrupt.png)" in caplog.text and "1 bad metadata line (line 6)" in caplog.text


def _folder_with_one_huge_image(folder, huge_size):
    """Two ordinary images and one of `huge_size` (1-bit: a few KB on disk however large)."""
    write_imagefolder(folder, [np.zeros((32, 32, 3), np.uint8)] * 2, ["small 0", "small 1"])
    Image.new("1", huge_size).save(folder / "huge.png")
    with open(folder / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "huge.png", "text": "huge"}) + "\n")


def test_imagefolder_skips_a_decompression_bomb(tmp_path, caplog):
    """15000×12000 is past PIL's limit, which raises DecompressionBombError: skipped, counted."""
    _folder_with_one_huge_image(tmp_path, (15000, 12000))
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(tmp_path, image_size=32)
    assert data.captions == ["small 0", "small 1"] and "1 unreadable" in caplog.text


def test_imagefolder_skips_a_large_image_when_bomb_warnings_are_errors(tmp_path, monkeypatch):
    _folder_with_one_huge_image(tmp_path, (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64×64 warns, 32×32 does not
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_imagefolder(tmp_path, image_size=32).captions == ["small 0", "small 1"]


def test_imagefolder_round_trip(tmp_path):
    data = make_shapes(5, seed=9)
    images = list(data.images.permute(0, 2, 3, 1).numpy())
    write_imagefolder(tmp_path, images, data.captions, data.attributes)
    back = load_imagefolder(tmp_path, image_size=32)
    assert torch.equal(back.images, data.images) and back.captions == data.captions
    assert back.attributes == data.attributes


def test_imagefolder_without_metadata_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_imagefolder(tmp_path)


def test_metadata_with_other_keys_says_which_keys_a_line_needs(tmp_path):
    """Hugging Face-style `image`/`caption` keys were skipped as "bad metadata line"s, then "no
    readable images", without saying what a line needs."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "caption": "a black square"}\n')
    with pytest.raises(ValueError, match=r"no readable images \(1 bad metadata line \(line 1\); each line of metadata.jsonl "
                                         r"gives 'file_name', .* and 'text'"):
        load_imagefolder(tmp_path)


def test_metadata_csv_is_read_as_hugging_faces_imagefolder_reads_it(tmp_path):
    """metadata.csv, the imagefolder layout's other form, was "no metadata.jsonl"."""
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text('file_name,text,colour\na.png,"a red square, filled",red\n'
                                           'b.png,"a blue\nsquare",blue\nmissing.png,a ghost,none\n'
                                           'c.png\n')
    data = load_imagefolder(tmp_path, image_size=8)
    assert data.captions == ["a red square, filled", "a blue\nsquare"]
    assert data.attributes == [{"colour": "red"}, {"colour": "blue"}]
    assert data.images[0, :, 0, 0].tolist() == [255, 0, 0]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n')
    with pytest.raises(ValueError, match="both metadata.jsonl and metadata.csv; keep one"):
        load_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    for text, why in (('file_name,text\na.png,"never closed\nb.png,blue\n', r"line 2 is not CSV \(unexpected end"),
                      ("file_name,text,text\na.png,red,blue\n", "the header names a column twice"),
                      ("file_name,text\na.png," + "x" * 200_000 + "\n", "line 2 is not CSV")):
        (tmp_path / "metadata.csv").write_text(text)  # the first had been one caption of the rest of the file
        with pytest.raises(ValueError, match=why):
            load_imagefolder(tmp_path)


def test_a_bad_csv_record_is_named_by_the_line_it_starts_on(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,text,colour\na.png,"two\nlines",black\n\na.png\na.png,short\n')
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(tmp_path, image_size=8)
    assert data.captions == ["two\nlines", "short"] and "bad metadata line (line 5)" in caplog.text  # past a blank one
    assert data.attributes == []  # the short row has no colour: not every image is labelled
    (tmp_path / "metadata.csv").write_text('file_name,text,colour,,\na.png,red,red,,\n')  # a spreadsheet's commas
    assert load_imagefolder(tmp_path, image_size=8).attributes == [{"colour": "red"}]
    (tmp_path / "metadata.csv").write_text('"file_name,text\na.png,red\n')
    with pytest.raises(ValueError, match="line 1 is not CSV"):
        load_imagefolder(tmp_path)


def test_hard_negatives_change_exactly_one_attribute():
    data = make_shapes(300, seed=10)
    assert len(data.negatives) == 300
    assert sum(n != c for n, c in zip(data.negatives, data.captions)) == 300
    held = parse_holdout(DEFAULT_HOLDOUT)
    rng = np.random.default_rng(0)
    changed = []
    for attrs in data.attributes:
        neg = negative_attributes(attrs, rng, held)
        diff = [k for k in ATTRIBUTES if neg[k] != attrs[k]]
        assert len(diff) == 1 and (neg["colour"], neg["shape"]) not in held
        changed.append(diff[0])
    assert changed.count("shape") > 0.4 * len(changed)  # the attribute that is easiest to ignore


ALL_PAIRS = ",".join(f"{c}:{s}" for c in COLOURS for s in ("circle", "square", "triangle", "cross"))


@pytest.mark.parametrize("holdout, message", [
    ("green:triangle,blue:triangle,yellow:triangle,purple:triangle,cyan:triangle",
     "leaves triangle with one colour (red)"),
    ("red:square,red:triangle,red:cross", "leaves red with one shape (circle)"),
    (ALL_PAIRS, "none is left for training"),
])
def test_holdout_that_leaves_no_negative_or_no_pair_is_refused(holdout, message):
    """Sampling and hard negatives would redraw forever: refused instead of hanging."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_holdout(holdout)
    with pytest.raises(ValueError):
        make_shapes(4, seed=0, cfg=ShapesConfig(holdout=holdout))
    # Two colours left for every shape (and two shapes for every colour) is enough.
    parse_holdout("green:triangle,blue:triangle,yellow:triangle,purple:triangle")


def test_imagefolder_metadata_that_is_not_utf8_fails_naming_the_file(tmp_path):
    data = make_shapes(2, seed=9)
    write_imagefolder(tmp_path, list(data.images.permute(0, 2, 3, 1).numpy()), ["a", "b"])
    meta = tmp_path / "metadata.jsonl"
    text = meta.read_text()
    meta.write_text(text, encoding="utf-16")
    with pytest.raises(ValueError, match=r"metadata.jsonl: not UTF-8"):
        load_imagefolder(tmp_path)
    meta.write_text(text, encoding="utf-8-sig")  # a byte-order mark, as some editors write
    assert load_imagefolder(tmp_path).captions == ["a", "b"]


def test_imagefolder_skips_captions_that_are_not_text_or_are_empty(tmp_path, caplog):
    """null, 42 or a list would be trained on as "None", "42", ...; an empty caption is a prompt
    the service refuses. Bad lines, like a file name that is not text."""
    bad = [None, 42, ["a list"], "", "   "]
    write_imagefolder(tmp_path, [np.zeros((32, 32, 3), np.uint8)] * (len(bad) + 1), ["kept"] + ["x"] * len(bad))
    meta = tmp_path / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    for row, text in zip(rows[1:], bad):
        row["text"] = text
    rows.append({"file_name": 7, "text": "its file name is not text"})
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level(logging.WARNING):
        assert load_imagefolder(tmp_path).captions == ["kept"]
    assert "skipped 6" in caplog.text and "6 bad metadata line" in caplog.text


def test_16_bit_grey_is_scaled_and_float_pixels_are_skipped(tmp_path, caplog):
    """PIL's own conversion turns 16-bit grey (PNG) almost white; float TIFFs have no known range."""
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 128 * 257
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.full((40, 40, 3), 7, dtype=np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f, "text": "a grey square"}) + "\n" for f in ("grey16.png", "float.tif", "rgb.png")))
    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(tmp_path, 32)
    assert len(data) == 2 and "1 unreadable" in caplog.text
    assert data.images[0].float().mean().item() == pytest.approx(128, abs=1)
    assert data.images[1].float().mean().item() == pytest.approx(7, abs=1)


def test_exif_orientation_is_applied_and_transparency_lies_over_white(tmp_path):
    """A phone photo (EXIF orientation 6: rotate 90°) trained sideways, and transparent pixels
    took whatever colour they stored (PIL's conversion drops the alpha)."""
    tall = np.zeros((60, 20, 3), dtype=np.uint8)  # 20 wide, 60 tall: red top, blue bottom as stored
    tall[:30], tall[30:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90° clockwise
    Image.fromarray(tall).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, but only the left half is opaque
    rgba[:, :20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    with Image.open(tmp_path / "phone.jpg") as img:
        upright = np.asarray(to_rgb(img))
    assert upright.shape == (20, 60, 3)  # wide now: the stored top (red) is on the right
    assert upright[10, 50, 0] > 200 > upright[10, 50, 2] and upright[10, 10, 2] > 200 > upright[10, 10, 0]
    with Image.open(tmp_path / "cutout.png") as img:
        cut = np.asarray(to_rgb(img))
    assert cut[20, 5].tolist() == [255, 0, 0] and cut[20, 35].tolist() == [255, 255, 255]


def test_imagefolder_skips_a_png_whose_chunk_is_broken(tmp_path, caplog):
    """PIL raises SyntaxError ("broken PNG file") for some corrupt chunks: the run stopped in a
    traceback, where an unreadable file is skipped and counted."""
    write_imagefolder(tmp_path, [np.zeros((32, 32, 3), np.uint8)] * 2, ["kept 0", "broken"])
    png = bytearray((tmp_path / "000001.png").read_bytes())
    png[36] = 0  # inside the IHDR chunk's type / the next chunk's header
    (tmp_path / "000001.png").write_bytes(bytes(png))
    with caplog.at_level(logging.WARNING):
        assert load_imagefolder(tmp_path).captions == ["kept 0"]
    assert "1 unreadable (000001.png)" in caplog.text


def test_imagefolder_keeps_a_caption_holding_a_line_separator(tmp_path, caplog):
    """JSON allows U+2028 unescaped in a string (json.dumps(ensure_ascii=False) writes it so);
    splitting the file with str.splitlines cut that line in two bad halves."""
    write_imagefolder(tmp_path, [np.zeros((32, 32, 3), np.uint8)] * 2, ["a", "b"])
    rows = [{"file_name": "000000.png", "text": "red\u2028circle"}, {"file_name": "000001.png", "text": "b\x85c"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    with caplog.at_level(logging.WARNING):
        assert load_imagefolder(tmp_path).captions == ["red\u2028circle", "b\x85c"]
    assert "skipped" not in caplog.text


def test_imagefolder_that_cannot_be_read_or_is_a_file_is_named(tmp_path, monkeypatch):
    """A metadata.jsonl this user may not read ended in a PermissionError traceback; a file
    given for the folder was called "no such folder"."""
    write_imagefolder(tmp_path, [np.zeros((32, 32, 3), np.uint8)], ["a"])
    with pytest.raises(ValueError, match="metadata.jsonl: a file; --data names a folder"):
        load_imagefolder(tmp_path / "metadata.jsonl")
    deny_reading(monkeypatch, "metadata.jsonl")
    with pytest.raises(ValueError, match=r"metadata.jsonl: cannot be read \(Permission denied\)"):
        load_imagefolder(tmp_path)
