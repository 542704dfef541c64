"""The multi-product scenes data set: a deterministic builder, from real photos only, and its typed view.

    .venv/bin/python bench/scene_data.py [--scenes 120] [--seed 0] [--cache data/bench] [--example out.png]

Builds ``data/bench/scenes-v1/`` (``/data/`` is gitignored) and prints one JSON line of counts. A
second run with the same parameters finds the manifest and returns at once. ``bench/scenes.py`` reads
it through ``load()``; ``render_example()`` draws one scene with its true boxes (for the README).

Where the photos come from (nothing is downloaded but Debian packages, through ``apt-get download``;
their sha256 are pinned below and checked):

- ``tuxpaint-stamps-default`` 2022.06.04-1 (Debian bookworm, 161 MB): Tux Paint's stamps, RGBA
  cut-outs with an alpha mask. Only the photographic ones are used (see "Which stamps" below).
  Licence: GPL-2 (``/usr/share/doc/tuxpaint-stamps-default/copyright``: "Files: * Copyright:
  2002-2022 by Bill Kendrick ... License: GPL-2"), so the derived images are GPL-2 as well; they
  stay in ``data/`` and are not committed.
- ``opencv-doc`` 4.6.0+dfsg-12 (96 MB): OpenCV's sample photos, ``examples/data/``. Debian's
  copyright file puts them under "Files: *" (OpenCV's Apache-2.0); some originate in research data
  sets (Middlebury: aloe, rubberwhale; Oxford affine: graf, leuven). Lena is excluded by Debian.
- photos bundled with scikit-image and scikit-learn (``common.photos.load_photo``): coffee,
  motorcycle_left/right (Middlebury), astronaut, chelsea, rocket, china.jpg, flower.jpg, and three
  non-room photos (immunohistochemistry, hubble_deep_field, retina) used only for distractor crops.

Which stamps: of the 796 PNG stamps, 408 have cartoon, symbols, alphabet, roadsigns, flags, space
or _mirror (a flipped duplicate) in their path; 27 are in no shop category (people, clothes,
military other than vehicles, monuments); 85 fail ``is_photo``: >= 2500 opaque
pixels, >= 150 distinct colours among them (each channel quantised to 32 levels), fewer than 50% of
horizontally adjacent opaque pairs of identical colour (flat fills). The colour test alone lets
drawings through: every stamp that passed was looked at, and the drawings and paintings are listed
in ``CLIP_ART`` (25 paths; 10 of them, the painted fish, Santa, a pumpkin, a junk, would otherwise
be in). 251 photo stamps remain. Photo-realistic renders may remain (the soccer ball looks like
one), and the 10 Halloween grave stones look alike (hard negatives, kept on purpose).

Categories (``CATEGORIES``): a shop taxonomy over the stamps' folders, ``CATEGORY_OF_PATH``, the
longest matching prefix wins. "clothing" is absent: no clothing stamp is a photo.

What the set holds (``manifest.json``, paths relative to the set's folder; boxes are integer
``[x0, y0, x1, y1]`` pixels, x1/y1 exclusive):

- products (the targets, ``products``): about 45% of each category's stamps (at least 3, at most
  30; stamps whose opaque box has a long side >= 150 px are taken first), each with two catalogue
  images: ``white`` (the cut-out on white, 6% margin, box null: the catalogue style) and ``room``
  (the cut-out at 35-60% of the width in a real photo of ``ROOM_BACKGROUNDS``, its true box given;
  the bench may ingest it with or without the box). Plus 7 context products (below), one catalogue
  image each (style ``context``, box of the object in the crop, or null when the crop is the object).
- distractors: catalogue images of no target: every other stamp on white and in a room, and
  random crops (20-60% of each side) of the room photos and of three more bundled photos, assigned
  to categories so that every category has at least 120 distractors (at least 30 crops each).
- scenes, kind ``pasted``: a photo of ``SCENE_BACKGROUNDS`` (never a room photo), a random 75-100%
  crop, maybe mirrored, resized so its long side is 1024; 2-6 targets pasted (long side 12-35% of
  1024, rotated within +-20 degrees, brightness/contrast/channel-gain jitter), later ones on top,
  placed so that every object keeps >= 75% of its alpha area visible (occlusion by later objects and
  up to 10% of its width/height beyond the border). Box = the tight box of the object's visible
  mask (alpha >= 0.5, after rotation, clipping and occlusion). Targets are dealt from a shuffled
  deck, so each appears about equally often. JPEG quality 90.
- scenes, kind ``context``: real photo pairs, the product photographed twice: query
  ``box_in_scene.png`` / catalogue ``box.png`` (a cookie box in clutter, tilted and partly hidden);
  ``motorcycle_right`` / a crop of ``motorcycle_left`` (stereo pair, same bike); ``coffee`` / the cup
  crop mirrored; ``aloeR.jpg`` / the central part of ``aloeL.jpg`` (stereo; the plant's leaves reach
  every edge, so its box is nearly the whole photo); ``rubberwhale2.png`` / the toy whale cropped
  from ``rubberwhale1.png`` (optical-flow pair: nearly the same pixels); ``right.jpg`` / two books
  cropped from ``left.jpg`` (a second view; the one context scene with two objects). The boxes in
  these photos were measured by eye on zoomed views (``CONTEXT``); they are good to a few pixels.

Besides the fields above the manifest has ``style`` per catalogue image and distractor (white,
room, context, crop), ``background`` per room image and scene, ``licences``, and in ``parameters``
the sha256 of this file, so any change to the recipe rebuilds the set.

With the defaults (seed 0, 120 pasted scenes): 101 products (94 stamps + 7 context), 195 catalogue
images, 1,278 distractors, 126 scenes (120 pasted + 6 context) holding 477 objects (each stamp
target 5 times), 10 categories, 58 MB:

    category   products  catalogue images  distractors
    animals          30                60          198
    food             12                23          120
    hobbies           6                 9          120
    household         8                15          120
    medical           3                 6          120
    music             5                10          120
    plants           16                31          120
    seasonal          9                18          120
    sports            3                 6          120
    vehicles          9                17          120

Determinism: every image draws from its own ``numpy`` Generator seeded by (seed, stream, index), so
the catalogue does not change with ``--scenes``; the same seed gives the same bytes (checked: two
builds, identical sha256 of all 1,600 files; given the same Pillow/libjpeg and OpenCV). Build time
on 2 cores: about 25 s from nothing (download 3 s, unpacking the needed members 10 s, the images
11 s); the .debs (257 MB) and unpacked photos (36 MB) stay in ``<cache>/debs`` and ``<cache>/pkgs``.

Caveats: the catalogue of a context product is a crop of a photo taken from nearly the same place
(rubberwhale, motorcycle, aloe are stereo/flow pairs), so those queries are easy for the descriptor
and test the localisation more than the matching; stamps are small (median long side 200 px), so
pasted objects up to 358 px are often upscaled and a bit soft; the 12 scene photos are few, so each
background recurs about 10 times (each time another crop, maybe mirrored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.photos import load_photo

VERSION = 1
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "data" / "bench"
JPEG_QUALITY = 90

Box = tuple[int, int, int, int]


# --- sources: pinned Debian packages -------------------------------------------------------------


@dataclass(frozen=True)
class DebPackage:
    """One pinned .deb and the part of it the data set needs."""

    name: str
    version: str
    sha256: str
    keep: tuple[str, ...]  # regular expressions on member paths ("./usr/...") to extract

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"


TUXPAINT = DebPackage(
    "tuxpaint-stamps-default",
    "2022.06.04-1",
    "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
    (r"\./usr/share/tuxpaint/stamps/.*\.png", r"\./usr/share/doc/tuxpaint-stamps-default/copyright"),
)
OPENCV_DOC = DebPackage(
    "opencv-doc",
    "4.6.0+dfsg-12",
    "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
    (r"\./usr/share/doc/opencv-doc/examples/data/[^/]+\.(jpg|png)", r"\./usr/share/doc/opencv-doc/copyright"),
)
PACKAGES = (TUXPAINT, OPENCV_DOC)


@dataclass(frozen=True)
class Sources:
    """Where the extracted photos lie."""

    stamps: Path  # .../usr/share/tuxpaint/stamps (category folders of RGBA PNGs)
    stamps_copyright: Path
    opencv_data: Path  # .../usr/share/doc/opencv-doc/examples/data
    opencv_copyright: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(
            f"{tool} is not installed: the benchmark photos come from Debian packages fetched with "
            "`apt-get download` and unpacked with `dpkg-deb` (Debian/Ubuntu: packages apt and dpkg). "
            "Elsewhere, put " + ", ".join(p.filename for p in PACKAGES) + " into <cache>/debs by hand "
            "(checksums in bench/scene_data.py)."
        )
    return found


def _download(package: DebPackage, debs: Path) -> Path:
    deb = debs / package.filename
    if not deb.exists():
        apt_get = _need("apt-get")
        debs.mkdir(parents=True, exist_ok=True)
        spec = f"{package.name}={package.version}"
        done = subprocess.run([apt_get, "download", spec], cwd=debs, capture_output=True, text=True)
        if done.returncode != 0 or not deb.exists():
            raise RuntimeError(
                f"`apt-get download {spec}` failed ({done.stderr.strip()[-400:]}). It needs Debian "
                "bookworm's main archive in the apt sources and fresh lists (`apt-get update`)."
            )
    found = _sha256(deb)
    if found != package.sha256:
        raise RuntimeError(
            f"{deb}: sha256 {found}, expected {package.sha256}. The file is not the "
            f"pinned {package.name} {package.version}: delete it and run again."
        )
    return deb


def _extract(package: DebPackage, deb: Path, into: Path) -> None:
    """Unpack the members `package.keep` selects (skips the stamps' 7,858 sound files)."""
    if (into / ".complete").exists():
        return
    dpkg_deb = _need("dpkg-deb")
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    wanted = re.compile("|".join(f"(?:{k})" for k in package.keep))
    with subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and wanted.fullmatch(member.name):
                    tar.extract(member, into, filter="data")
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed (exit {proc.returncode})")
    (into / ".complete").write_text(f"{package.name} {package.version}\n")


def fetch_sources(cache: Path = DEFAULT_CACHE) -> Sources:
    """Download (once, checksummed) and unpack the pinned packages under `cache`."""
    cache = Path(cache)
    for package in PACKAGES:
        deb = _download(package, cache / "debs")
        _extract(package, deb, cache / "pkgs" / package.name)
    tux = cache / "pkgs" / TUXPAINT.name
    ocv = cache / "pkgs" / OPENCV_DOC.name
    return Sources(
        stamps=tux / "usr/share/tuxpaint/stamps",
        stamps_copyright=tux / "usr/share/doc/tuxpaint-stamps-default/copyright",
        opencv_data=ocv / "usr/share/doc/opencv-doc/examples/data",
        opencv_copyright=ocv / "usr/share/doc/opencv-doc/copyright",
    )


# --- what is used, as data ---------------------------------------------------------------------------

CATEGORIES = ("animals", "food", "hobbies", "household", "medical", "music", "plants", "seasonal", "sports", "vehicles")

# Stamp path prefix -> category (None: not a product); the longest matching prefix wins.
CATEGORY_OF_PATH: dict[str, str | None] = {
    "animals": "animals",  # animal figurines and toys
    "animals/mammals/bears/toys": "hobbies",  # a teddy bear
    "clothes": None,  # only drawings (hats, a button) pass the filter
    "food": "food",
    "hobbies": "hobbies",  # a camera, binoculars
    "hobbies/music": "music",
    "household": "household",  # kettle, pitcher, bins, tools, lightbulb, toilet
    "household/rubberduck.png": "hobbies",
    "medical": "medical",
    "military": None,
    "military/vehicles": "vehicles",
    "naturalforces": None,  # fire, smoke
    "people": None,
    "people/toys": "hobbies",  # a rag doll
    "plants": "plants",
    "plants/mushrooms": "food",
    "seasonal": "seasonal",  # Christmas food and decorations, Halloween props
    "seasonal/easter": None,  # cartoons only
    "sports": "sports",
    "town": "household",  # post boxes and a mailbox
    "town/monuments": None,
    "vehicles": "vehicles",
}
SKIP_PATH_WORDS = ("cartoon", "symbols", "alphabet", "roadsigns", "flags", "space", "_mirror")
MIN_OPAQUE_PX = 2500
MIN_COLOURS = 150  # distinct colours at 32 levels per channel among the opaque pixels
MAX_FLAT_SHARE = 0.5  # share of horizontal opaque neighbours of identical colour (flat fills)
# Drawings and paintings that pass the tests above, found by looking at every stamp that passed.
CLIP_ART = frozenset(
    {
        "animals/fish/bluegroper.png",
        "animals/fish/butterflyfish.png",
        "animals/fish/dolphinfish.png",
        "animals/fish/moonwrasse.png",
        "animals/fish/stripedfish.png",
        "animals/mammals/aquatic/whale.png",
        "clothes/button.png",
        "clothes/hats/feathered_hat.png",
        "clothes/hats/propeller_hat.png",
        "food/pizza.png",
        "people/body_parts/eye.png",
        "seasonal/christmas/Santa.png",
        "seasonal/easter/bluebird.png",
        "seasonal/easter/bunny-egg.png",
        "seasonal/easter/bunny.png",
        "seasonal/easter/butterfly.png",
        "seasonal/easter/chick-hatched.png",
        "seasonal/easter/chick-in-egg.png",
        "seasonal/easter/chick.png",
        "seasonal/easter/daffodil.png",
        "seasonal/halloween/jackolantern_mean.png",
        "seasonal/newyears/fireworks2.png",
        "vehicles/ship/chineseJunk.png",
        "naturalforces/explosion.png",
        "naturalforces/fire.png",
    }
)

# Photos as ("opencv", file in examples/data) or ("bundled", common.photos name). Scenes and the
# "room" catalogue images never share a photo.
PhotoRef = tuple[str, str]
SCENE_BACKGROUNDS: tuple[PhotoRef, ...] = (
    ("opencv", "home.jpg"),
    ("opencv", "building.jpg"),
    ("opencv", "leuvenA.jpg"),
    ("opencv", "aero1.jpg"),
    ("opencv", "graf1.png"),
    ("opencv", "board.jpg"),
    ("opencv", "stuff.jpg"),
    ("opencv", "messi5.jpg"),
    ("opencv", "ela_original.jpg"),
    ("opencv", "fruits.jpg"),
    ("bundled", "china.jpg"),
    ("bundled", "rocket"),
)
# leuvenB, aero3, graf3 and ela_modified are left out: the same street, city, wall and notebook as
# leuvenA, aero1, graf1 and ela_original.
ROOM_BACKGROUNDS: tuple[PhotoRef, ...] = (
    ("opencv", "baboon.jpg"),
    ("opencv", "squirrel_cls.jpg"),
    ("opencv", "butterfly.jpg"),
    ("opencv", "orange.jpg"),
    ("opencv", "apple.jpg"),
    ("opencv", "chicky_512.png"),
    ("opencv", "licenseplate_motion.jpg"),
    ("opencv", "pca_test1.jpg"),
    ("opencv", "sudoku.png"),
    ("opencv", "text_defocus.jpg"),
    ("bundled", "astronaut"),
    ("bundled", "chelsea"),
    ("bundled", "flower.jpg"),
)
# Distractor crops: the room photos and these (not the scene photos: a query's own background
# in the catalogue would be an unrealistic pixel-exact match; not the context photos either).
EXTRA_CROP_PHOTOS: tuple[PhotoRef, ...] = (
    ("bundled", "immunohistochemistry"),
    ("bundled", "hubble_deep_field"),
    ("bundled", "retina"),
)


@dataclass(frozen=True)
class ContextObject:
    """A product photographed twice: its catalogue crop and its box in the query photo."""

    product_id: str
    category: str
    catalogue: PhotoRef
    catalogue_box: Box | None  # the object in the catalogue photo, cut with a 4% margin (None: all)
    query_box: Box  # the object in the query photo, measured by eye on zoomed views
    mirror: bool = False  # mirror the catalogue crop (the same photo serves as the query)
    fills_crop: bool = False  # the object goes beyond the crop: no box in the catalogue image


@dataclass(frozen=True)
class ContextScene:
    scene_id: str
    query: PhotoRef
    objects: tuple[ContextObject, ...]


CONTEXT = (
    # The cookie box, tilted; its upper right corner is under the rice box and the white bag hides
    # its lower left corner (SIFT homography corners (119,161) (285,175) (268,299) (90,273)).
    ContextScene(
        "context-cookie-box",
        ("opencv", "box_in_scene.png"),
        (ContextObject("context:cookie-box", "food", ("opencv", "box.png"), None, (98, 161, 270, 298)),),
    ),
    # Stereo pair: mirror tip at y=15, tail light and front tyre at the sides, tyre bottom at 451.
    ContextScene(
        "context-motorcycle",
        ("bundled", "motorcycle_right"),
        (
            ContextObject(
                "context:motorcycle", "vehicles", ("bundled", "motorcycle_left"), (93, 15, 683, 451), (50, 15, 628, 451)
            ),
        ),
    ),
    # The cup with its handle, without the saucer and the spoon.
    ContextScene(
        "context-coffee-cup",
        ("bundled", "coffee"),
        (
            ContextObject(
                "context:coffee-cup",
                "household",
                ("bundled", "coffee"),
                (174, 18, 407, 298),
                (174, 18, 407, 298),
                mirror=True,
            ),
        ),
    ),
    # The potted aloe: leaves reach the left, right and top edges; the pot ends at y~1085 and the
    # lowest leaf tip at y~1096. The catalogue keeps the pot and the rosette of aloeL.
    ContextScene(
        "context-aloe",
        ("opencv", "aloeR.jpg"),
        (
            ContextObject(
                "context:potted-aloe",
                "plants",
                ("opencv", "aloeL.jpg"),
                (330, 0, 1282, 1110),
                (0, 0, 1282, 1097),
                fills_crop=True,
            ),
        ),
    ),
    # The green rubber whale on the striped cloth (optical-flow pair: it barely moves).
    ContextScene(
        "context-rubber-whale",
        ("opencv", "rubberwhale2.png"),
        (
            ContextObject(
                "context:rubber-whale",
                "hobbies",
                ("opencv", "rubberwhale1.png"),
                (218, 90, 318, 185),
                (218, 89, 318, 184),
            ),
        ),
    ),
    # Two books from another viewpoint; "Let Us C" is partly behind "Basic Electronics".
    ContextScene(
        "context-books",
        ("opencv", "right.jpg"),
        (
            ContextObject(
                "context:book-basic-electronics",
                "hobbies",
                ("opencv", "left.jpg"),
                (263, 107, 404, 328),
                (317, 109, 551, 422),
            ),
            ContextObject(
                "context:book-let-us-c", "hobbies", ("opencv", "left.jpg"), (86, 134, 273, 381), (216, 111, 352, 325)
            ),
        ),
    ),
)

# Random streams: each image has its own Generator([seed, stream, index]).
_STREAM_TARGETS, _STREAM_CATALOGUE, _STREAM_CROPS, _STREAM_SCENES, _STREAM_DECK, _STREAM_SLOTS = range(1, 7)


@dataclass(frozen=True)
class BuildParameters:
    seed: int = 0
    scenes: int = 120
    target_share: float = 0.45  # of each category's stamps
    min_targets: int = 3
    max_targets: int = 30
    min_distractors: int = 120  # per category
    min_crops: int = 30  # per category
    scene_long_side: int = 1024
    objects_per_scene: tuple[int, int] = (2, 6)
    object_size: tuple[float, float] = (0.12, 0.35)  # long side, share of the scene's long side
    max_rotation_deg: float = 20.0
    min_visible: float = 0.75
    room_width: tuple[float, float] = (0.35, 0.60)
    crop_side: tuple[float, float] = (0.20, 0.60)
    packages: tuple[str, ...] = tuple(f"{p.name}={p.version}" for p in PACKAGES)

    def as_json(self) -> dict[str, Any]:
        """The parameters and a digest of this file: any change to the recipe rebuilds the set."""
        return {
            **json.loads(json.dumps(asdict(self))),
            "builder_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        }


# --- the typed view of manifest.json ----------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueImage:
    image_id: str
    path: str
    box: Box | None
    style: str  # "white" | "room" | "context"


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str
    source: str
    images: tuple[CatalogueImage, ...]


@dataclass(frozen=True)
class Distractor:
    product_id: str
    category: str
    path: str
    box: Box | None
    style: str  # "white" | "room" | "crop"


@dataclass(frozen=True)
class SceneObject:
    product_id: str
    box: Box


@dataclass(frozen=True)
class Scene:
    scene_id: str
    path: str
    kind: str  # "pasted" | "context"
    width: int
    height: int
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Manifest:
    root: Path
    version: int
    parameters: dict[str, Any]
    categories: tuple[str, ...]
    products: tuple[Product, ...]
    distractors: tuple[Distractor, ...]
    scenes: tuple[Scene, ...]
    _by_id: dict[str, Product] = field(default_factory=dict, repr=False, compare=False)

    def file(self, relative: str) -> Path:
        """The absolute path of a manifest path."""
        return self.root / relative

    def product(self, product_id: str) -> Product:
        if not self._by_id:
            self._by_id.update((p.product_id, p) for p in self.products)
        return self._by_id[product_id]

    def scene(self, scene_id: str) -> Scene:
        return next(s for s in self.scenes if s.scene_id == scene_id)


def _box(value: Sequence[int] | None) -> Box | None:
    return None if value is None else (int(value[0]), int(value[1]), int(value[2]), int(value[3]))


def _required_box(value: Sequence[int]) -> Box:
    box = _box(value)
    assert box is not None
    return box


def load(path: Path | str) -> Manifest:
    """The data set at `path` (its folder or its manifest.json)."""
    path = Path(path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    raw = json.loads(manifest_path.read_text())
    return Manifest(
        root=manifest_path.parent,
        version=raw["version"],
        parameters=raw["parameters"],
        categories=tuple(raw["categories"]),
        products=tuple(
            Product(
                p["product_id"],
                p["category"],
                p["source"],
                tuple(
                    CatalogueImage(i["image_id"], i["path"], _box(i["box"]), i.get("style", "")) for i in p["images"]
                ),
            )
            for p in raw["products"]
        ),
        distractors=tuple(
            Distractor(d["product_id"], d["category"], d["path"], _box(d["box"]), d.get("style", ""))
            for d in raw["distractors"]
        ),
        scenes=tuple(
            Scene(
                s["scene_id"],
                s["path"],
                s["kind"],
                s["width"],
                s["height"],
                tuple(SceneObject(o["product_id"], _required_box(o["box"])) for o in s["objects"]),
            )
            for s in raw["scenes"]
        ),
    )


# --- image helpers (pure numpy / OpenCV) -----------------------------------------------------------


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _mask_box(mask: np.ndarray) -> Box | None:
    """(H, W) bool -> tight [x0, y0, x1, y1) of its True pixels, or None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 4) float32 premultiplied, in [0, 1]."""
    out = rgba.astype(np.float32) / 255
    out[..., :3] *= out[..., 3:4]
    return out


def resize_premultiplied(sprite: np.ndarray, scale: float) -> np.ndarray:
    """(H, W, 4) float32 premultiplied -> scaled; premultiplied so edges take no colour from
    the transparent pixels."""
    h, w = sprite.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = cv2.resize(sprite, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    out[..., 3] = np.clip(out[..., 3], 0, 1)
    np.clip(out[..., :3], 0, out[..., 3:4], out=out[..., :3])
    return out


def rotate_premultiplied(sprite: np.ndarray, degrees: float) -> np.ndarray:
    """(H, W, 4) float32 premultiplied -> rotated about its centre on a canvas that holds it all."""
    h, w = sprite.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = math.ceil(h * sin + w * cos), math.ceil(h * cos + w * sin)
    matrix[0, 2] += new_w / 2 - w / 2
    matrix[1, 2] += new_h / 2 - h / 2
    return cv2.warpAffine(
        sprite, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0)
    )


def trim(sprite: np.ndarray, threshold: float = 1 / 255) -> np.ndarray:
    """Crop a premultiplied sprite to the box of its non-transparent pixels."""
    box = _mask_box(sprite[..., 3] >= threshold)
    assert box is not None, "an empty sprite"
    x0, y0, x1, y1 = box
    return sprite[y0:y1, x0:x1]


def composite(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int) -> None:
    """Paint a premultiplied sprite onto a float32 RGB canvas in [0, 1] at (x, y), clipped."""
    h, w = sprite.shape[:2]
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 >= x1 or y0 >= y1:
        return
    part = sprite[y0 - y : y1 - y, x0 - x : x1 - x]
    region = canvas[y0:y1, x0:x1]
    region *= 1 - part[..., 3:4]
    region += part[..., :3]


def on_white(rgba: np.ndarray, margin: float = 0.06) -> np.ndarray:
    """(H, W, 4) uint8 cut-out -> (H', W', 3) uint8 on white with a margin of `margin` x long side."""
    pad = round(margin * max(rgba.shape[:2])) + 2
    sprite = premultiply(rgba)
    canvas = np.ones((rgba.shape[0] + 2 * pad, rgba.shape[1] + 2 * pad, 3), np.float32)
    composite(canvas, sprite, pad, pad)
    return _to_uint8(canvas)


def jitter_colour(sprite: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild brightness, contrast and per-channel gain change of a premultiplied sprite."""
    alpha = sprite[..., 3:4]
    out = sprite.copy()
    weight = max(float(alpha.sum()), 1e-6)
    mean = out[..., :3].sum(axis=(0, 1)) / weight
    contrast = rng.uniform(0.85, 1.15)
    gains = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3)
    out[..., :3] = ((out[..., :3] - mean * alpha) * contrast + mean * alpha) * gains
    np.clip(out[..., :3], 0, alpha, out=out[..., :3])
    return out


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


# --- stamps --------------------------------------------------------------------------------------


@dataclass
class Stamp:
    path: str  # relative to the stamps folder, e.g. "animals/birds/crow.png"
    category: str
    rgba: np.ndarray  # (H, W, 4) uint8, cropped to its non-transparent pixels

    @property
    def product_id(self) -> str:
        return "stamp:" + self.path.removesuffix(".png")

    @property
    def file_stem(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.path.removesuffix(".png").lower()).strip("-")


def category_of(path: str) -> str | None:
    best = max((p for p in CATEGORY_OF_PATH if path == p or path.startswith(p + "/")), key=len, default=None)
    return None if best is None else CATEGORY_OF_PATH[best]


def is_photo(rgba: np.ndarray) -> bool:
    """Whether a cut-out looks photographic: large enough, many colours, few flat fills."""
    opaque = rgba[..., 3] >= 128
    if int(opaque.sum()) < MIN_OPAQUE_PX:
        return False
    quantised = (rgba[..., :3][opaque] // 8).astype(np.int32)
    colours = np.unique(quantised[:, 0] * 1024 + quantised[:, 1] * 32 + quantised[:, 2]).size
    if colours < MIN_COLOURS:
        return False
    pairs = opaque[:, 1:] & opaque[:, :-1]
    same = (rgba[:, 1:, :3] == rgba[:, :-1, :3]).all(axis=-1)
    return float(same[pairs].mean()) < MAX_FLAT_SHARE


def photo_stamps(stamps_dir: Path) -> list[Stamp]:
    """The photographic stamps with a category, sorted by path, pixel duplicates dropped."""
    found, seen = [], set()
    files = sorted(stamps_dir.rglob("*.png"))
    for file in tqdm(files, desc="stamps", unit="png", leave=False):
        rel = file.relative_to(stamps_dir).as_posix()
        category = category_of(rel)
        if category is None or rel in CLIP_ART or any(w in rel for w in SKIP_PATH_WORDS):
            continue
        with Image.open(file) as im:
            rgba = np.asarray(im.convert("RGBA"))
        box = _mask_box(rgba[..., 3] >= 8)
        if box is None or not is_photo(rgba):
            continue
        rgba = np.ascontiguousarray(rgba[box[1] : box[3], box[0] : box[2]])
        digest = hashlib.sha256(rgba.tobytes()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        found.append(Stamp(rel, category, rgba))
    return found


def choose_targets(stamps: list[Stamp], params: BuildParameters) -> set[str]:
    """Paths of the target stamps: a share of each category, larger stamps first."""
    targets: set[str] = set()
    for index, category in enumerate(CATEGORIES):
        members = [s for s in stamps if s.category == category]
        count = min(
            len(members), params.max_targets, max(params.min_targets, round(params.target_share * len(members)))
        )
        order = _rng(params.seed, _STREAM_TARGETS, index).permutation(len(members))
        ranked = sorted(order, key=lambda i: max(members[i].rgba.shape[:2]) < 150)  # stable
        targets.update(members[i].path for i in ranked[:count])
    return targets


# --- photos ----------------------------------------------------------------------------------------


class Photos:
    """Real photos by reference, RGB uint8, loaded once."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self._cache: dict[PhotoRef, np.ndarray] = {}

    def __call__(self, ref: PhotoRef) -> np.ndarray:
        if ref not in self._cache:
            kind, name = ref
            if kind == "opencv":
                with Image.open(self._sources.opencv_data / name) as im:
                    image = np.asarray(im.convert("RGB"))
            else:
                image = load_photo(name)
            self._cache[ref] = np.ascontiguousarray(image)
        return self._cache[ref]


def in_room(
    rgba: np.ndarray, room: np.ndarray, params: BuildParameters, rng: np.random.Generator
) -> tuple[np.ndarray, Box]:
    """The cut-out at 35-60% of the room photo's width (at most 90% of its height) -> photo, box."""
    H, W = room.shape[:2]
    h, w = rgba.shape[:2]
    scale = min(rng.uniform(*params.room_width) * W / w, 0.9 * H / h)
    sprite = resize_premultiplied(premultiply(rgba), scale)
    sh, sw = sprite.shape[:2]
    x, y = int(rng.integers(0, W - sw + 1)), int(rng.integers(0, H - sh + 1))
    canvas = room.astype(np.float32) / 255
    composite(canvas, sprite, x, y)
    box = _mask_box(sprite[..., 3] >= 0.5)
    assert box is not None
    return _to_uint8(canvas), (box[0] + x, box[1] + y, box[2] + x, box[3] + y)


def random_crop(photo: np.ndarray, side: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    H, W = photo.shape[:2]
    h, w = round(H * rng.uniform(*side)), round(W * rng.uniform(*side))
    y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    return np.ascontiguousarray(photo[y : y + h, x : x + w])


# --- scenes ----------------------------------------------------------------------------------------


def place(
    canvas_hw: tuple[int, int],
    masks: list[np.ndarray],
    min_visible: float,
    overflow: float,
    rng: np.random.Generator,
    tries: int = 80,
) -> tuple[list[tuple[int, int] | None], np.ndarray]:
    """Positions for masks painted in order, each keeping >= min_visible of its area visible.

    `masks` (h, w) bool each; returns per mask its (x, y) or None (no place found), and the
    (H, W) int16 map of which mask shows at each pixel (-1: background).
    """
    H, W = canvas_hw
    owner = np.full((H, W), -1, np.int16)
    areas: list[int] = []
    visible: list[int] = []
    positions: list[tuple[int, int] | None] = []
    for index, mask in enumerate(masks):
        h, w = mask.shape
        area = int(mask.sum())
        for _ in range(tries):
            x = int(rng.integers(-int(overflow * w), W - w + int(overflow * w) + 1))
            y = int(rng.integers(-int(overflow * h), H - h + int(overflow * h) + 1))
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
            part = mask[y0 - y : y1 - y, x0 - x : x1 - x]
            own = int(part.sum())
            if own < min_visible * area:
                continue
            under = owner[y0:y1, x0:x1][part]
            lost = np.bincount(under[under >= 0], minlength=len(areas))
            if any(visible[k] - lost[k] < min_visible * areas[k] for k in range(len(areas))):
                continue
            for k in range(len(visible)):
                visible[k] -= int(lost[k])
            owner[y0:y1, x0:x1][part] = index
            areas.append(area)
            visible.append(own)
            positions.append((x, y))
            break
        else:  # no place: it takes no area, so it constrains nothing that comes after it
            areas.append(0)
            visible.append(0)
            positions.append(None)
    return positions, owner


def pasted_scene(
    background: np.ndarray, stamps: list[Stamp], params: BuildParameters, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """One query photo: the background cropped, maybe mirrored, long side 1024, stamps pasted."""
    base = random_crop(background, (0.75, 1.0), rng)
    if rng.random() < 0.5:
        base = base[:, ::-1]
    base = resize_long_side(np.ascontiguousarray(base), params.scene_long_side)
    H, W = base.shape[:2]
    sprites = []
    for stamp in stamps:
        sprite = premultiply(stamp.rgba)
        if rng.random() < 0.5:
            sprite = sprite[:, ::-1]
        long_side = rng.uniform(*params.object_size) * params.scene_long_side
        sprite = resize_premultiplied(np.ascontiguousarray(sprite), long_side / max(sprite.shape[:2]))
        sprite = jitter_colour(sprite, rng)
        angle = rng.uniform(-params.max_rotation_deg, params.max_rotation_deg)
        sprites.append(trim(rotate_premultiplied(sprite, angle)))
    positions, owner = place((H, W), [s[..., 3] >= 0.5 for s in sprites], params.min_visible, 0.1, rng)
    canvas = base.astype(np.float32) / 255
    objects = []
    for index, (stamp, sprite, spot) in enumerate(zip(stamps, sprites, positions)):
        if spot is None:
            continue
        composite(canvas, sprite, *spot)
        box = _mask_box(owner == index)
        assert box is not None
        objects.append((stamp.product_id, box))
    return _to_uint8(canvas), objects


def _deal(targets: list[Stamp], counts: list[int], rng: np.random.Generator) -> list[list[Stamp]]:
    """Targets for each scene from reshuffled decks: each target about equally often, no repeats
    within a scene."""
    deck: list[int] = []
    hands = []
    for count in counts:
        hand: list[int] = []
        while len(hand) < count:
            if not deck:
                deck = list(rng.permutation(len(targets)))
            pick = next((i for i, t in enumerate(deck) if t not in hand), None)
            if pick is None:  # the deck's rest is all in this hand: start a fresh deck
                deck = list(rng.permutation(len(targets)))
                continue
            hand.append(int(deck.pop(pick)))
        hands.append([targets[i] for i in hand])
    return hands


# --- build -----------------------------------------------------------------------------------------


def _crop_box(ref_shape: tuple[int, ...], box: Box, margin: float = 0.04) -> tuple[Box, Box]:
    """A crop around `box` with a margin, clipped -> (crop, box inside the crop)."""
    H, W = ref_shape[:2]
    x0, y0, x1, y1 = box
    mx, my = round(margin * (x1 - x0)), round(margin * (y1 - y0))
    crop = (max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my))
    return crop, (x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1])


def build(cache: Path = DEFAULT_CACHE, seed: int = 0, scenes: int = 120, **overrides: Any) -> Path:
    """Build (or find) the data set under `cache`/scenes-v1 and return its folder.

    `overrides` are other `BuildParameters` fields. The work is skipped when the folder's
    manifest was built with the same parameters by the same version of this file.
    """
    cache = Path(cache)
    params = BuildParameters(seed=seed, scenes=scenes, **overrides)
    out = cache / f"scenes-v{VERSION}"
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if existing.get("version") == VERSION and existing.get("parameters") == params.as_json():
            return out
    sources = fetch_sources(cache)
    work = cache / f"scenes-v{VERSION}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    photos = Photos(sources)

    stamps = photo_stamps(sources.stamps)
    target_paths = choose_targets(stamps, params)
    rooms = [photos(ref) for ref in ROOM_BACKGROUNDS]

    products: list[dict[str, Any]] = []
    distractors: list[dict[str, Any]] = []
    for index, stamp in enumerate(tqdm(stamps, desc="catalogue", unit="stamp", leave=False)):
        rng = _rng(seed, _STREAM_CATALOGUE, index)
        room_index = int(rng.integers(len(rooms)))
        room_image, room_box = in_room(stamp.rgba, rooms[room_index], params, rng)
        is_target = stamp.path in target_paths
        folder = "catalogue" if is_target else "distractors"
        white_path = f"{folder}/{stamp.category}/{stamp.file_stem}_white.jpg"
        room_path = f"{folder}/{stamp.category}/{stamp.file_stem}_room.jpg"
        _save_jpeg(on_white(stamp.rgba), work / white_path)
        _save_jpeg(room_image, work / room_path)
        if is_target:
            products.append(
                {
                    "product_id": stamp.product_id,
                    "category": stamp.category,
                    "source": f"{TUXPAINT.name} {TUXPAINT.version}: {stamp.path}",
                    "images": [
                        {"image_id": stamp.product_id + "#white", "path": white_path, "box": None, "style": "white"},
                        {
                            "image_id": stamp.product_id + "#room",
                            "path": room_path,
                            "box": list(room_box),
                            "style": "room",
                            "background": ROOM_BACKGROUNDS[room_index][1],
                        },
                    ],
                }
            )
        else:
            distractors.append(
                {
                    "product_id": stamp.product_id + "#white",
                    "category": stamp.category,
                    "path": white_path,
                    "box": None,
                    "style": "white",
                }
            )
            distractors.append(
                {
                    "product_id": stamp.product_id + "#room",
                    "category": stamp.category,
                    "path": room_path,
                    "box": list(room_box),
                    "style": "room",
                }
            )

    # Crops, so that every category has at least min_distractors (and min_crops crops).
    held = {c: sum(d["category"] == c for d in distractors) for c in CATEGORIES}
    slots = [c for c in CATEGORIES for _ in range(max(params.min_crops, params.min_distractors - held[c]))]
    slots = [slots[i] for i in _rng(seed, _STREAM_SLOTS, 0).permutation(len(slots))]
    crop_sources = ROOM_BACKGROUNDS + EXTRA_CROP_PHOTOS
    for index, category in enumerate(tqdm(slots, desc="crops", unit="crop", leave=False)):
        rng = _rng(seed, _STREAM_CROPS, index)
        ref = crop_sources[index % len(crop_sources)]
        crop = random_crop(photos(ref), params.crop_side, rng)
        name = re.sub(r"[^a-z0-9]+", "-", ref[1].lower())
        path = f"distractors/{category}/crop-{index:04d}-{name}.jpg"
        _save_jpeg(crop, work / path)
        distractors.append(
            {
                "product_id": f"crop:{index:04d}:{ref[1]}",
                "category": category,
                "path": path,
                "box": None,
                "style": "crop",
            }
        )

    scene_rows: list[dict[str, Any]] = []
    for context in CONTEXT:
        query = photos(context.query)
        for obj in context.objects:
            photo = photos(obj.catalogue)
            if obj.catalogue_box is None:
                image, box = photo, None
            else:
                (cx0, cy0, cx1, cy1), box = _crop_box(photo.shape, obj.catalogue_box)
                image = photo[cy0:cy1, cx0:cx1]
                box = None if obj.fills_crop else box
            if obj.mirror:
                image = image[:, ::-1]
                if box is not None:
                    box = (image.shape[1] - box[2], box[1], image.shape[1] - box[0], box[3])
            path = f"catalogue/{obj.category}/{obj.product_id.replace(':', '-')}.jpg"
            _save_jpeg(np.ascontiguousarray(image), work / path)
            products.append(
                {
                    "product_id": obj.product_id,
                    "category": obj.category,
                    "source": f"{obj.catalogue[0]}: {obj.catalogue[1]}" + (" (mirrored)" if obj.mirror else ""),
                    "images": [
                        {
                            "image_id": obj.product_id + "#context",
                            "path": path,
                            "box": None if box is None else list(box),
                            "style": "context",
                        }
                    ],
                }
            )
        path = f"scenes/{context.scene_id}.jpg"
        _save_jpeg(query, work / path)
        scene_rows.append(
            {
                "scene_id": context.scene_id,
                "path": path,
                "kind": "context",
                "width": int(query.shape[1]),
                "height": int(query.shape[0]),
                "background": context.query[1],
                "objects": [{"product_id": o.product_id, "box": list(o.query_box)} for o in context.objects],
            }
        )

    targets = [s for s in stamps if s.path in target_paths]
    deck_rng = _rng(seed, _STREAM_DECK, 0)
    counts = [
        int(c) for c in deck_rng.integers(params.objects_per_scene[0], params.objects_per_scene[1] + 1, size=scenes)
    ]
    hands = _deal(targets, counts, deck_rng)
    background_order = deck_rng.permutation(max(scenes, 1)) % len(SCENE_BACKGROUNDS)
    for index in tqdm(range(scenes), desc="scenes", unit="scene", leave=False):
        rng = _rng(seed, _STREAM_SCENES, index)
        ref = SCENE_BACKGROUNDS[int(background_order[index])]
        image, objects = pasted_scene(photos(ref), hands[index], params, rng)
        path = f"scenes/scene-{index:04d}.jpg"
        _save_jpeg(image, work / path)
        scene_rows.append(
            {
                "scene_id": f"scene-{index:04d}",
                "path": path,
                "kind": "pasted",
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "background": ref[1],
                "objects": [{"product_id": pid, "box": list(box)} for pid, box in objects],
            }
        )

    manifest = {
        "version": VERSION,
        "parameters": params.as_json(),
        "categories": list(CATEGORIES),
        "licences": {
            TUXPAINT.name: "GPL-2 (see its /usr/share/doc/.../copyright)",
            OPENCV_DOC.name: "Apache-2.0 per Debian's copyright (Files: *)",
            "bundled": "scikit-image / scikit-learn sample images",
        },
        "products": products,
        "distractors": distractors,
        "scenes": scene_rows,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)
    return out


# --- a picture for the README ---------------------------------------------------------------------

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


def render_example(manifest: Manifest, scene_id: str, out_png: Path | str) -> Path:
    """Draw one scene with its true boxes and product ids (and categories) into `out_png`."""
    scene = manifest.scene(scene_id)
    with Image.open(manifest.file(scene.path)) as im:
        picture = im.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, picture.width // 64))
    width = max(2, picture.width // 300)
    for index, obj in enumerate(scene.objects):
        colour = PALETTE[index % len(PALETTE)]
        draw.rectangle(obj.box, outline=colour, width=width)
        name = re.split(r"[:/]", obj.product_id)[-1]
        label = f"{name} ({manifest.product(obj.product_id).category})"
        left, top, right, bottom = font.getbbox(label)
        text_w, text_h = right - left + 2 * width, bottom - top + 2 * width
        x = min(obj.box[0], picture.width - text_w)
        y = obj.box[1] - text_h if obj.box[1] >= text_h else obj.box[1]  # above the box, else inside
        draw.rectangle((x, y, x + text_w, y + text_h), fill=colour)
        draw.text((x + width - left, y + width - top), label, fill=(0, 0, 0), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out_png)
    return out_png


def summary(manifest: Manifest) -> dict[str, Any]:
    """Counts of the data set, overall and per category."""
    per_category = {c: {"products": 0, "catalogue_images": 0, "distractors": 0} for c in manifest.categories}
    for product in manifest.products:
        per_category[product.category]["products"] += 1
        per_category[product.category]["catalogue_images"] += len(product.images)
    for distractor in manifest.distractors:
        per_category[distractor.category]["distractors"] += 1
    return {
        "products": len(manifest.products),
        "catalogue_images": sum(len(p.images) for p in manifest.products),
        "distractors": len(manifest.distractors),
        "scenes": len(manifest.scenes),
        "context_scenes": sum(s.kind == "context" for s in manifest.scenes),
        "objects": sum(len(s.objects) for s in manifest.scenes),
        "categories": len(manifest.categories),
        "per_category": per_category,
    }


def _iter_boxes(manifest: Manifest) -> Iterator[tuple[str, Box, int, int]]:
    for scene in manifest.scenes:
        for obj in scene.objects:
            yield scene.scene_id, obj.box, scene.width, scene.height


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=120, help="pasted query scenes (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="downloads, unpacked packages and the data set (default data/bench)",
    )
    parser.add_argument("--example", type=Path, help="also draw the first pasted scene into this PNG")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = build(args.cache, seed=args.seed, scenes=args.scenes)
    manifest = load(path)
    for scene_id, box, width, height in _iter_boxes(manifest):
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height, (scene_id, box)
    if args.example:
        first = next(s.scene_id for s in manifest.scenes if s.kind == "pasted")
        render_example(manifest, first, args.example)
    print(json.dumps({**summary(manifest), "build_s": round(time.perf_counter() - started, 1), "path": str(path)}))


if __name__ == "__main__":
    main()
