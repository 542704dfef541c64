"""The `mps` command line against the real suite."""

import numpy as np
from PIL import Image

from common.images import encode_jpeg, encode_png
from common.photos import load_photo
from gateway.cli import main


def test_ingest_folder_then_search_with_a_picture(suite, tmp_path, capsys):
    folder = tmp_path / "cups"
    folder.mkdir()
    coffee = load_photo("coffee")
    (folder / "white_cup.jpg").write_bytes(encode_jpeg(coffee[23:310, 150:429]))
    (folder / "cat.jpg").write_bytes(encode_jpeg(load_photo("chelsea")))
    (folder / "notes.txt").write_text("not an image")
    address = ["--address", suite.addresses["gateway"]]
    assert main(address + ["ingest", str(folder), "--category", "cli-cups"]) == 0
    assert "indexed 2 images into 'cli-cups'" in capsys.readouterr().out

    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_png(coffee))
    picture = tmp_path / "result.png"
    assert main(address + ["search", str(photo), "--region", "150,23,429,310:cli-cups", "--picture", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "white_cup" in out and "cli-cups" in out and "detect" in out
    with Image.open(picture) as drawn:
        assert drawn.width > coffee.shape[1] and drawn.height >= coffee.shape[0]


def test_errors_are_reported_not_raised(suite, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["--address", suite.addresses["gateway"], "search", str(bad)]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_malformed_region_is_a_clear_usage_error():
    import pytest

    from gateway.cli import parse_region

    assert parse_region("1,2,3,4:tops") == ((1.0, 2.0, 3.0, 4.0), "tops")
    with pytest.raises(SystemExit, match="X0,Y0,X1,Y1\\[:CATEGORY\\]"):
        parse_region("1,2,3:tops")


def _video_catalogue(address: str) -> None:
    from gateway.client import VisualSearchClient
    from tests.helpers import shop_catalogue

    with VisualSearchClient(address) as client:  # the products of tests/e2e/test_video.py
        client.index_products(shop_catalogue(distractors=False))


def test_video_file_is_tracked_summarised_and_annotated(suite, tmp_path, capsys):
    import cv2

    from tests.helpers import video_clip

    _video_catalogue(suite.addresses["gateway"])
    frames, cut = video_clip(pan=6, zoom=2, after_cut=3)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, (640, 360))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "annotated.avi"
    assert main(["--address", suite.addresses["gateway"], "video", str(clip), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert f"frames: {len(frames)} received, {len(frames)} processed, 0 skipped" in printed
    bike = [line for line in lines if "moto-left" in line and "vehicles" in line]
    # the motorbike before the cut (frames 1 to the cut) and after it: two tracks
    assert any(f" 1-{cut} " in line for line in bike), printed
    assert any(f" {cut + 1}-{len(frames)} " in line for line in bike), printed
    written = cv2.VideoCapture(str(out))
    count, first = 0, None
    while True:
        ok, bgr = written.read()
        if not ok:
            break
        first = bgr if first is None else first
        count += 1
    written.release()
    assert count == len(frames)
    assert first is not None and first.shape == (360, 640, 3)
    # the boxes are drawn: the annotated frame differs from the source where a box is
    assert np.abs(first.astype(int) - cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR).astype(int)).max() > 100


def test_video_from_a_folder_and_from_stdin(suite, tmp_path, capsys, monkeypatch):
    import io

    from tests.helpers import video_clip

    _video_catalogue(suite.addresses["gateway"])
    frames, _ = video_clip(pan=4, zoom=0, after_cut=0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for n, frame in enumerate(frames):
        (folder / f"{n:04d}.jpg").write_bytes(encode_jpeg(frame))
    (folder / "readme.txt").write_text("not a frame")
    out = tmp_path / "annotated"
    address = ["--address", suite.addresses["gateway"]]
    assert main(address + ["video", str(folder), "--out", str(out), "--top-k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "frames: 4 received, 4 processed" in printed and "moto-left" in printed
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{n:06d}.png" for n in range(1, 5)]

    jpegs = b"".join(encode_jpeg(frame) for frame in frames)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(jpegs)))
    assert main(address + ["video", "-"]) == 0
    assert "frames: 4 received, 4 processed" in capsys.readouterr().out


def test_video_that_cannot_be_opened_says_so(suite, tmp_path):
    import pytest

    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(SystemExit, match="OpenCV cannot open it as a video"):
        main(["--address", suite.addresses["gateway"], "video", str(bad)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main(["--address", suite.addresses["gateway"], "video", str(empty)])
