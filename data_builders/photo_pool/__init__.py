"""Real photographs from five Debian data packages, each file checked by a person.

The ``*.txt`` lists beside this module (copied from the project's checked photo-pool notes) name
every file that is used, as ``PATH<TAB>WxH`` (``RCC_FILE:INNER_PATH`` for gcompris); nothing
unlisted is ever read. About 327 photos: natural scenes, animals, monuments, people and objects.

=========================  ==========================================================================
package                    how the photos are stored
=========================  ==========================================================================
gcompris-qt-data           lossy WebP inside Qt ``.rcc`` resource files (``readers.RccArchive``);
                           cropped, rescaled and sharpened upstream, so they are shrunk up to 2x
                           (``GCOMPRIS_SHRINK``, INTER_AREA), but not below ``GCOMPRIS_KEEP_SIDE``
lomiri-wallpapers-16.04    JPEG wallpapers up to 5312 px, decoded at reduced size (libjpeg DCT
                           scaling) and brought to ``MAX_SIDE``
kphotoalbum                24 JPEG demo photos; fetched with ``apt-get download`` + ``dpkg -x`` into
                           ``kphotoalbum_root()`` (the application itself pulls a KDE stack); four are
                           rotated as the demo's ``index.xml`` says (``KPHOTOALBUM_ROTATIONS``)
jigzo-data                 ``.pzl`` puzzles (``readers.pzl_entries``): ``<name>.jpg`` is a 1024x1024
                           texture atlas, cropped to the listed ``(0, 0, W, H)``
palapeli-data              plain JPEG files
=========================  ==========================================================================

Licences come per file from each package's DEP-5 ``copyright`` file where it has one (gcompris,
lomiri, jigzo; palapeli has one package-wide entry), else the package's summary (kphotoalbum:
GPL-2+). A missing package is skipped with one warning that gives its install line.

``LOUPE_PHOTO_PACKAGES`` (environment) picks the packages used: unset = all, ``none`` = none, or a
comma-separated list of package names (e.g. to build with the older, smaller pool for comparison).
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .readers import licence_of, pzl_read, pzl_texture_name, rcc_read

log = logging.getLogger(__name__)

LIST_DIR = Path(__file__).resolve().parent
MAX_SIDE = 1024  # long side of every loaded photo at most (INTER_AREA); keeps memory and load time small
GCOMPRIS_SHRINK = 0.5  # gcompris photos were sharpened and WebP-encoded upstream: shrink up to 2x ...
GCOMPRIS_KEEP_SIDE = 448  # ... but keep the short side at least the quality builder's default view
ENV_PACKAGES = "LOUPE_PHOTO_PACKAGES"
# From the demo's index.xml (angle="..."): degrees clockwise to show each photo upright.
KPHOTOALBUM_ROTATIONS = {"grand_canyon_1": 180, "wayne": 90, "new_wave_1": 90, "pool_2": 270}


@dataclass(frozen=True)
class Package:
    name: str  # the Debian package; also the ``source`` of its SourceImages
    list_file: str
    install: str
    licence: str  # summary, used when the copyright file has nothing for a file
    copyright: str = ""  # installed path of the package's copyright file
    cached: bool = False  # fetched into kphotoalbum_root() rather than installed


PACKAGES: tuple[Package, ...] = (
    Package("gcompris-qt-data", "gcompris-rcc.txt",
            "apt-get install --no-install-recommends gcompris-qt-data (or: make system-deps)",
            "per file: public domain, CC0, CC-BY, CC-BY-SA, GPL-3 (see its copyright file)",
            "/usr/share/doc/gcompris-qt-data/copyright"),
    Package("lomiri-wallpapers-16.04", "lomiri-wallpapers-16.04.txt",
            "apt-get install lomiri-wallpapers-16.04 (or: make system-deps)",
            "CC-BY-4.0, CC-BY-SA-4.0 or CC0-1.0 per file (see its copyright file)",
            "/usr/share/doc/lomiri-wallpapers-16.04/copyright"),
    Package("kphotoalbum", "kphotoalbum.txt",
            "make system-deps (as root), or: apt-get download kphotoalbum && dpkg -x kphotoalbum_*.deb "
            "<cache>/debian/kphotoalbum",
            "GPL-2+ (KPhotoAlbum demo data, (c) Jesper K. Pedersen et al.)",
            "/usr/share/doc/kphotoalbum/copyright", cached=True),
    Package("jigzo-data", "jigzo-crops.txt", "apt-get install jigzo-data (or: make system-deps)",
            "GPL-2+", "/usr/share/doc/jigzo-data/copyright"),
    Package("palapeli-data", "palapeli-data.txt", "apt-get install palapeli-data (or: make system-deps)",
            "GPL-2+", "/usr/share/doc/palapeli-data/copyright"),
)
PACKAGE_NAMES = tuple(p.name for p in PACKAGES)


def cache_base() -> Path:
    """Loupe's cache folder: ``$LOUPE_CACHE``, else ``$XDG_CACHE_HOME/loupe``, else ``~/.cache/loupe``. The
    same rule as the packaged bases' cache (``assistant.packaged_bases.cache_root``, which this layer may not
    import), so one variable moves the pool index, kphotoalbum's photos and the converted bases together."""
    if os.environ.get("LOUPE_CACHE"):
        return Path(os.environ["LOUPE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loupe"


def kphotoalbum_root() -> Path:
    """Where ``make system-deps`` unpacks kphotoalbum's .deb (``dpkg -x``): ``<cache>/debian/kphotoalbum``."""
    return cache_base() / "debian" / "kphotoalbum"


def package_root(pkg: Package) -> Path:
    """The folder the listed absolute paths live under: ``/``, or the unpacked .deb for kphotoalbum
    (an installed kphotoalbum is used when present)."""
    if pkg.cached:
        first = read_list(pkg)[0].path
        if not Path(first).exists() and (kphotoalbum_root() / first.lstrip("/")).exists():
            return kphotoalbum_root()
    return Path("/")


# ---- the lists ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listed:
    path: str  # installed absolute path of the file (the .rcc for gcompris)
    member: str | None  # inner path (.rcc); .pzl entries are found by ``readers.pzl_texture_name``
    size: tuple[int, int]  # W, H as listed: the photo, or for jigzo the crop of the atlas


_SIZE = re.compile(r"^(\d+)x(\d+)$")


def read_list(pkg: Package) -> list[Listed]:
    """The checked files of ``pkg``, from its list beside this module."""
    path = LIST_DIR / pkg.list_file
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = [c for c in line.split("\t") if c.strip()]
        m = _SIZE.match(cols[1].strip()) if len(cols) >= 2 else None
        if m is None:
            raise ValueError(f"{path}:{no}: expected 'PATH<TAB>WxH', got {line!r}")
        file, member = cols[0].strip(), None
        if ".rcc:" in file:
            file, member = file.split(":", 1)
        out.append(Listed(file, member, (int(m.group(1)), int(m.group(2)))))
    return out


def selected_packages() -> tuple[Package, ...]:
    """The packages ``LOUPE_PHOTO_PACKAGES`` asks for (all when unset)."""
    raw = os.environ.get(ENV_PACKAGES)
    if raw is None:
        return PACKAGES
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = sorted(set(names) - set(PACKAGE_NAMES))
    if unknown:
        raise ValueError(f"{ENV_PACKAGES}: unknown package(s) {unknown}; choose from {', '.join(PACKAGE_NAMES)} "
                         f"or 'none'")
    return tuple(p for p in PACKAGES if p.name in names)


# ---- candidates -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One listed photo, found on disk, with everything its SourceImage needs."""

    id: str
    package: str
    path: str
    member: str | None
    crop: tuple[int, int] | None
    rotate: int
    long_side: int | None
    licence: str
    origin: str
    name_key: str  # photos sharing it are one group (same subject under another file name)


def _long_side(pkg: Package, w: int, h: int) -> int | None:
    long, short = max(w, h), min(w, h)
    f = min(1.0, MAX_SIDE / long)
    if pkg.name == "gcompris-qt-data":
        f = min(f, max(GCOMPRIS_SHRINK, GCOMPRIS_KEEP_SIDE / short))
    return None if f >= 1.0 else max(1, round(long * f))


def _licence(pkg: Package, root: Path, item: Listed) -> str:
    copyright_file = root / pkg.copyright.lstrip("/")
    found = None
    if pkg.name == "gcompris-qt-data" and item.member:
        # inner paths mirror the source tree under 'gcompris/'; sources are .jpg/.png, installed .webp
        found = licence_of(copyright_file, item.member.removeprefix("gcompris/"), any_extension=True)
    elif pkg.name == "lomiri-wallpapers-16.04":
        found = licence_of(copyright_file, "16.04/" + Path(item.path).name)
    elif pkg.name == "jigzo-data":
        found = licence_of(copyright_file, "puzzles/00_default/" + Path(item.path).name)
    elif pkg.name == "palapeli-data":
        found = licence_of(copyright_file, Path(item.path).name)  # one package-wide entry
    return found or pkg.licence


# gcompris shows some monuments in several activities under other names (checked by eye): one subject each.
GCOMPRIS_SUBJECTS = {
    "toureiffel": "eiffeltower", "neuschwanstein": "neuschwansteincastle", "chenonceau": "chateaudechenonceau",
    "gizahpyramids": "greatpyramidofgiza", "greatpyramid": "greatpyramidofgiza", "operasidney": "operahouse",
    "greatwallofchina": "greatwall", "kutubminar": "qutubminar", "louvre20070224c": "lemusee",
}


def gcompris_subject(stem: str) -> str:
    """``TourEiffel_background`` and ``eiffelTower`` -> ``eiffeltower``: the name key of a gcompris photo."""
    s = re.sub(r"[^a-z0-9]", "", stem.lower().removesuffix("_background"))
    return GCOMPRIS_SUBJECTS.get(s, s)


def _candidate(pkg: Package, root: Path, item: Listed) -> Candidate:
    path = str(root / item.path.lstrip("/"))
    stem = Path(item.member or item.path).stem
    member = pzl_texture_name(path) if path.endswith(".pzl") else item.member
    if pkg.name == "gcompris-qt-data":
        rel = (item.member or "").removeprefix("gcompris/src/activities/")
        sid = f"{pkg.name}:{rel.rsplit('.', 1)[0]}"
        key = f"{pkg.name}:{gcompris_subject(stem)}"  # the same monument in two activities: one group
        origin = f"Debian {pkg.name} ({Path(item.path).name})"
    else:
        sid = f"{pkg.name}:{stem}"
        # kphotoalbum's 'name' / 'name_2' / 'name_1' are shots of one subject and session
        key = f"{pkg.name}:{re.sub(r'_[0-9]+$', '', stem)}" if pkg.name == "kphotoalbum" else sid
        origin = f"Debian {pkg.name}" + (" (unpacked .deb, not installed)" if root != Path("/") else "")
    w, h = item.size
    crop = item.size if item.path.endswith(".pzl") else None
    return Candidate(id=sid, package=pkg.name, path=path, member=member,
                     crop=crop, rotate=KPHOTOALBUM_ROTATIONS.get(stem, 0) if pkg.name == "kphotoalbum" else 0,
                     long_side=_long_side(pkg, w, h), licence=_licence(pkg, root, item), origin=origin,
                     name_key=key)


_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def candidates(packages: tuple[Package, ...] | None = None) -> list[Candidate]:
    """The listed photos that are on this machine. A package that is absent is skipped with one warning
    giving its install line; listed files missing from an installed package are counted in a warning."""
    out: list[Candidate] = []
    for pkg in selected_packages() if packages is None else packages:
        listed = read_list(pkg)
        root = package_root(pkg)
        present = [it for it in listed if (root / it.path.lstrip("/")).is_file()]
        if not present:
            _warn_once(pkg.name, "Debian package %s is missing: its %d photos are left out of the pool; "
                       "install: %s", pkg.name, len(listed), pkg.install)
            continue
        if len(present) < len(listed):
            _warn_once(pkg.name + ":partial", "%s: %d of %d listed files are missing (another package "
                       "version?); using the %d found", pkg.name, len(listed) - len(present), len(listed),
                       len(present))
        for it in present:
            try:
                out.append(_candidate(pkg, root, it))
            except (OSError, ValueError) as exc:  # e.g. a .pzl of another layout: skip that file only
                log.warning("%s: skipping %s: %s", pkg.name, it.path, exc)
    return out


# ---- decoding -------------------------------------------------------------------------------------

def read_bytes(path: str, member: str | None) -> bytes:
    """The encoded image: a plain file, an .rcc resource or a .pzl entry."""
    if member is None:
        return Path(path).read_bytes()
    if path.endswith(".rcc"):
        return rcc_read(path, member)
    if path.endswith(".pzl"):
        return pzl_read(path, member)
    raise ValueError(f"{path}: no reader for members of this kind of file ({member!r})")


_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def decode(path: str, member: str | None = None, crop: tuple[int, int] | None = None, rotate: int = 0,
           long_side: int | None = None) -> np.ndarray:
    """uint8 HxWx3 RGB: decoded (Pillow: JPEG and WebP), cropped to ``(0, 0, W, H)``, rotated clockwise,
    then shrunk with INTER_AREA so the long side is at most ``long_side``.

    JPEGs much larger than ``long_side`` are decoded at 1/2, 1/4 or 1/8 scale first (libjpeg's DCT
    scaling, Pillow's ``draft``), still at least ``long_side``, so a 16 MP wallpaper costs a fraction
    of a full decode. EXIF orientation is applied unless ``rotate`` is given (it then says it all).
    """
    from PIL import Image, ImageOps

    name = f"{path}:{member}" if member else path
    try:
        im = Image.open(io.BytesIO(read_bytes(path, member)))
        if long_side and crop is None and im.format == "JPEG":
            w, h = im.size
            s = long_side / max(w, h)
            if s < 0.5:
                im.draft("RGB", (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
        if not rotate:
            im = ImageOps.exif_transpose(im)
        img = np.asarray(im.convert("RGB"))
    except (OSError, KeyError, ValueError, SyntaxError) as exc:  # Pillow raises these on bad data
        raise ValueError(f"{name}: not a readable image ({exc})") from exc
    if crop is not None:
        cw, ch = crop
        if img.shape[1] < cw or img.shape[0] < ch:
            raise ValueError(f"{name}: {img.shape[1]}x{img.shape[0]} is smaller than the crop {cw}x{ch}")
        img = img[:ch, :cw]
    if rotate:
        if rotate not in _ROTATE:
            raise ValueError(f"{name}: rotation must be 90, 180 or 270 degrees, got {rotate}")
        img = cv2.rotate(img, _ROTATE[rotate])
    if long_side and max(img.shape[:2]) > long_side:
        f = long_side / max(img.shape[:2])
        size = (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)
