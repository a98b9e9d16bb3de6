"""Image files -> model input, and the predict command's per-file behaviour (no MLflow needed)."""

import csv
import io
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cifar10_cnn import images, predict, serving


def save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


def test_any_size_and_mode_becomes_32x32_rgb(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "rgba.png": Image.fromarray(rng.integers(0, 256, (60, 100, 4), dtype=np.uint8), "RGBA"),
        "grey.jpg": Image.fromarray(rng.integers(0, 256, (500, 300), dtype=np.uint8), "L"),
        "palette.gif": Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P"),
        "tiny.bmp": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        pixels = images.load(tmp_path / name)
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, name


def test_16_bit_images_are_scaled_to_8_bits_and_float_ones_refused(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # a 16-bit grey PNG, dark to light
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = images.load(tmp_path / "ramp.png")
    assert 120 < pixels.mean() < 135 and pixels.min() < 10 and pixels.max() > 245  # not clipped to white
    for ramp32 in (np.linspace(0, 2**31 - 1, 64 * 64), np.linspace(-(2**31), 2**31 - 1, 64 * 64)):  # 32-bit
        Image.fromarray(ramp32.reshape(64, 64).astype(np.int32)).save(tmp_path / "ramp.tiff")
        assert 120 < images.load(tmp_path / "ramp.tiff").mean() < 135
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(images.UnreadableImage, match="a floating-point image"):
        images.load(tmp_path / "float.tiff")


def test_a_32x32_png_is_taken_as_is(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(images.load(save(tmp_path / "x.png", pixels)), pixels)


def test_resizing_averages_instead_of_sampling(tmp_path):
    # A fine checkerboard shrinks to grey with antialiasing; point sampling would keep black or white.
    board = (np.indices((320, 320)).sum(0) % 2 * 255).astype(np.uint8)
    pixels = images.load(save(tmp_path / "board.png", np.stack([board] * 3, -1)))
    assert 100 < pixels.mean() < 155 and pixels.std() < 20


@pytest.mark.parametrize("what", ["empty", "text", "truncated", "bomb", "too large", "folder", "other format",
                                  "bad exif"])
def test_hostile_files_are_refused_with_a_reason(tmp_path, what):
    path = tmp_path / f"{what}.png"
    if what == "empty":
        path.write_bytes(b"")
        message = "empty file"
    elif what == "text":
        path.write_text("this is not an image\n")
        message = "not an image file of a format taken here"
    elif what == "truncated":
        data = (tmp_path / "ok.png")
        save(data, np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        path.write_bytes(data.read_bytes()[:400])
        message = "corrupt image"
    elif what == "bomb":  # 400 megapixels of black compress to a few kB
        Image.new("1", (20_000, 20_000)).save(path)
        assert path.stat().st_size < 2**20
        message = "decompression bomb"
    elif what == "other format":  # a DirectDraw texture: Pillow reads it, through a decoder nobody needs here
        path.write_bytes(b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
                         + struct.pack("<2I", 32, 0) + bytes(104))
        message = "not an image file of a format taken here"
    elif what == "bad exif":  # a SHORT tag holding text: Pillow's EXIF rotation raises struct.error on it
        image = Image.new("RGB", (24, 24))
        exif = image.getexif()
        exif[0x0112], exif[0x010E] = 6, "hello"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", exif=exif)
        data = buffer.getvalue()
        at = data.index(b"Exif") + 6
        tag, other = (b"\x01\x0e", b"\x01\x4c") if data[at:at + 2] == b"MM" else (b"\x0e\x01", b"\x4c\x01")
        path.write_bytes(data[:at] + data[at:].replace(tag, other, 1))  # ImageDescription -> InkSet (SHORT)
        message = "corrupt image"
    elif what == "too large":
        with open(path, "wb") as f:  # sparse: costs no disk
            f.truncate(images.MAX_FILE_BYTES + 1)
        message = "larger than the 50 MiB limit"
    else:
        path.mkdir()
        message = "not a regular file"
    with pytest.raises(images.UnreadableImage, match=message) as err:
        images.load(path)
    assert str(path) in str(err.value)


def fake_model(batch):
    """Class = brightest channel, as a table shaped like the pyfunc's."""
    assert batch.dtype == np.uint8 and batch.shape[1:] == (32, 32, 3)
    scores = batch.reshape(len(batch), -1, 3).mean(1)
    probabilities = np.zeros((len(batch), 10))
    probabilities[:, :3] = scores / scores.sum(1, keepdims=True)
    return serving.table(probabilities, [f"c{i}" for i in range(10)])


def test_classify_goes_on_past_bad_files_and_keeps_the_order(tmp_path):
    red = save(tmp_path / "red.png", np.full((50, 50, 3), (250, 10, 10), np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    blue = save(tmp_path / "blue.jpg", np.full((20, 90, 3), (5, 5, 240), np.uint8), quality=95)
    results = predict.classify([red, bad, blue], fake_model, batch_size=1)
    assert [r.path for r in results] == [red, bad, blue]
    assert results[0].label == "c0" and results[2].label == "c2"
    assert results[1].label is None and "not an image" in results[1].error
    assert results[0].probability == pytest.approx(250 / 270, abs=0.01) and len(results[0].probabilities) == 10


def test_folder_csv_is_complete(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    save(folder / "a.png", np.full((40, 40, 3), (0, 200, 0), np.uint8))
    save(folder / "sub" / "b.png", np.full((40, 40, 3), (200, 0, 0), np.uint8))
    save(folder / os.fsdecode(b"z-caf\xe9.png"), np.full((40, 40, 3), (0, 0, 200), np.uint8))  # not UTF-8
    (folder / "notes.txt").write_text("hello")
    (folder / ".hidden.png").write_text("skipped")
    paths = images.files_under(folder)
    assert [p.relative_to(folder).as_posix() for p in paths][:3] == ["a.png", "notes.txt", "sub/b.png"]
    dest = tmp_path / "out" / "predictions.csv"
    predict.write_csv(predict.classify(paths, fake_model), [f"c{i}" for i in range(10)], dest)
    rows = list(csv.DictReader(dest.open(encoding="utf-8")))
    assert [r["class"] for r in rows] == ["c1", "", "c0", "c2"]
    assert rows[3]["path"].endswith("z-caf\\udce9.png")  # its bytes escaped, the file still valid UTF-8
    assert "not an image" in rows[1]["error"] and rows[0]["error"] == ""
    assert float(rows[0]["p_c1"]) == pytest.approx(1.0) and list(dest.parent.iterdir()) == [dest]


def test_special_files_in_a_folder_are_listed_as_errors(tmp_path):
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    save(folder / "ok.png", np.full((32, 32, 3), (200, 0, 0), np.uint8))
    (folder / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "up").symlink_to(tmp_path)  # a link to a folder: listed, not followed
    results = predict.classify(images.files_under(folder), fake_model)
    errors = {Path(r.path).name: r.error for r in results if r.error}
    assert [Path(r.path).name for r in results if not r.error] == ["ok.png"]
    assert "not a regular file (a character device behind a symbolic link)" in errors["zero.png"]
    assert "not a regular file (a named pipe)" in errors["pipe.png"]
    assert "Too many levels of symbolic links" in errors["loop.png"]
    assert "not a regular file (a folder behind a symbolic link)" in errors["up"]


def test_in_process_predictions_take_any_number_of_images_in_chunks(monkeypatch):
    model = serving.Classifier.__new__(serving.Classifier)  # its network: the brightest channel, recorded
    model.class_names, model.max_batch, chunks = [f"c{i}" for i in range(10)], 4, []
    model._logits = lambda x: (chunks.append(len(x)), fake_model(x)["probabilities"].tolist())[1]
    pixels = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    for request in (pixels, pd.DataFrame({"0": [base64_png(p) for p in pixels]})):  # "0": spark_udf's column
        chunks.clear()
        assert list(model.predict(request)["class"]) == list(fake_model(pixels)["class"])
        assert chunks == [4, 4, 2]
    monkeypatch.setenv(serving.SERVING_ENV, "true")  # inside MLflow's scoring server: one request is bounded
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException, match="send between 1 and 4 images per request, got 10"):
        model.predict(pixels)


def base64_png(pixels) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_long_error_messages_are_cut_and_keep_what_went_wrong():
    request = "x" * 100_000
    cut = serving.shorten(f"Failed to predict data '{request}'. \nError: image 3: not valid base64")
    assert cut == "Failed to predict the request's data.\nError: image 3: not valid base64"
    cut = serving.shorten(f"Ensure that input is a valid JSON formatted string.\nInput: \n{request}\n")
    assert len(cut) < serving.MAX_ERROR_CHARS + 100 and cut.endswith("more characters not shown)")


@pytest.mark.parametrize("data, message", [
    (np.zeros((2, 32, 32, 3)) + 0.5, "got fractions"),
    (np.full((1, 32, 32, 3), 256), "in 0..255"),
    (np.full((1, 32, 32, 3), -1), "in 0..255"),
    (np.zeros((1, 3, 32, 32), np.uint8), "shape [N, 32, 32, 3]"),
    (np.zeros((0, 32, 32, 3), np.uint8), "between 1 and 8 images"),
    (np.zeros((9, 32, 32, 3), np.uint8), "between 1 and 8 images"),
    (np.array([["a"]]), "integers 0..255, got text; image files go base64-encoded under a name"),
    (np.full((1, 32, 32, 3), np.nan), "got NaN or infinity"),
    (pd.DataFrame({"x": [1]}), "exactly one column, 'image'"),
    ({"pixels": np.zeros((1, 32, 32, 3))}, "or 'images' .pixel arrays."),
])
def test_serving_refuses_what_the_model_cannot_take(data, message):
    with pytest.raises(serving.InvalidImages, match=message.replace("[", r"\[").replace("]", r"\]")):
        serving.check_images(data, max_batch=8)


def test_serving_takes_integers_of_any_width_and_integral_floats():
    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3))
    for data in (pixels, pixels.astype(float), pixels.astype(np.uint8), {"images": pixels.tolist()}):
        out = serving.check_images(data, max_batch=8)
        assert out.dtype == np.uint8 and np.array_equal(out, pixels)


def encoded(path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_encoded_images_become_the_same_pixels_as_files(tmp_path):
    rng = np.random.default_rng(4)
    files = [save(tmp_path / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
             save(tmp_path / "b.jpg", rng.integers(0, 256, (90, 60, 3), dtype=np.uint8), quality=80),
             save(tmp_path / "c.png", rng.integers(0, 256, (50, 50), dtype=np.uint8), "L")]
    expected = np.stack([images.load(f) for f in files])
    as_text = [encoded(f) for f in files]
    as_text[1] = "data:image/jpeg;base64," + as_text[1]  # what a browser's FileReader gives
    for request in (pd.DataFrame({"image": as_text}), {"image": np.array(as_text)},
                    pd.DataFrame({"image": [f.read_bytes() for f in files]})):
        assert np.array_equal(serving.check_images(request, max_batch=8), expected)


def test_exif_orientation_is_applied_to_uploads(tmp_path):
    tall = np.zeros((64, 32, 3), np.uint8)
    tall[:32] = 255  # white top half
    image = Image.fromarray(tall)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = serving.check_images(pd.DataFrame({"image": [encoded(tmp_path / "rotated.jpg")]}), 1)[0]
    assert pixels[:, 16:].mean() > 200 and pixels[:, :16].mean() < 50  # white on the right once rotated


@pytest.mark.parametrize("what, request_, message", [
    ("bad base64", pd.DataFrame({"image": ["not base64!"]}), "image 0: not valid base64"),
    ("a data URL without data", pd.DataFrame({"image": ["data:image/png;base64"]}), "image 0: empty"),
    ("not an image", {"image": np.array(["aGVsbG8gd29ybGQ="])}, "image 0: not an image file of a format taken here"),
    ("a number", pd.DataFrame({"image": [12]}), "image 0: expected a base64 string"),
    ("wrong column", pd.DataFrame({"picture": ["aGVsbG8="]}), "exactly one column, 'image'"),
    ("wrong input", {"photo": np.array(["aGVsbG8="])}, "one input named 'image'"),
    ("too many", pd.DataFrame({"image": ["aGVsbG8="] * 5}), "between 1 and 4 images per request, got 5"),
])
def test_bad_uploads_are_refused_naming_the_problem(what, request_, message):
    with pytest.raises(serving.InvalidImages, match=message):
        serving.check_images(request_, max_batch=4)


def test_a_request_decodes_a_bounded_number_of_pixels_in_all(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_REQUEST_PIXELS", 2 * 64 * 64)
    photo = encoded(save(tmp_path / "photo.png", np.zeros((64, 64, 3), np.uint8)))
    request_ = pd.DataFrame({"image": [photo] * 3})
    with pytest.raises(serving.InvalidImages, match="image 2: the request's images hold more than 8,192 pixels"):
        serving.check_images(request_, max_batch=4)  # served: refused before the third is decoded
    assert serving.check_images(request_, max_batch=None).shape == (3, 32, 32, 3)  # in-process: the caller's CPU


def test_an_uploaded_decompression_bomb_is_refused(tmp_path):
    Image.new("1", (20_000, 20_000)).save(tmp_path / "bomb.png")
    good = save(tmp_path / "ok.png", np.zeros((32, 32, 3), np.uint8))
    request_ = pd.DataFrame({"image": [encoded(good), encoded(tmp_path / "bomb.png")]})
    with pytest.raises(serving.InvalidImages, match="image 1: .*decompression bomb"):
        serving.check_images(request_, max_batch=4)
