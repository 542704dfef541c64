"""The `mps` command line against the real suite."""

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
