"""Short content descriptions of the built-in pool, for the "content" part of detailed answers.

Photos get a hand-written caption; procedural scenes and stamp scenes are described from how they
were made; user images get a neutral phrase. Captions avoid every taxonomy phrasing and rating word
(``safe_content`` checks), so they cannot be misread as a distortion or a rating.
"""

from __future__ import annotations

import re
from pathlib import Path

from loupe_vlm.prompts.parsing import find_terms, parse_distortions
from loupe_vlm.prompts import RATINGS, SEVERITIES

from .sources import SourceImage

PHOTO_CAPTIONS = {
    "skimage:astronaut": "a portrait of an astronaut in an orange suit in front of a flag",
    "skimage:chelsea": "a close-up of a tabby cat",
    "skimage:coffee": "a cup of coffee on a saucer with a spoon",
    "skimage:ihc": "a stained tissue sample under a microscope",
    "skimage:motorcycle_left": "a motorcycle parked in a garage",
    "skimage:motorcycle_right": "a motorcycle parked in a garage",
    "skimage:retina": "a photograph of the back of a human eye",
    "skimage:rocket": "a rocket on its launch pad",
    "matplotlib:grace_hopper": "a portrait of a woman in a navy uniform",
    "opencv-doc:aero1": "an aerial view of fields and buildings",
    "opencv-doc:aero3": "an aerial view of fields and buildings",
    "opencv-doc:aloeL": "a potted aloe plant",
    "opencv-doc:aloeR": "a potted aloe plant",
    "opencv-doc:apple": "a red apple",
    "opencv-doc:baboon": "the face of a mandrill with a red and blue snout",
    "opencv-doc:board": "a game board with pieces on a table",
    "opencv-doc:building": "the facade of a building with many windows",
    "opencv-doc:butterfly": "a butterfly resting on a flower",
    "opencv-doc:chicky_512": "a small yellow chick",
    "opencv-doc:fruits": "a pile of fruit, with peppers and apples",
    "opencv-doc:graf1": "graffiti painted on a wall",
    "opencv-doc:graf3": "graffiti painted on a wall",
    "opencv-doc:home": "a living room with furniture",
    "opencv-doc:left": "an indoor scene with objects on a table",
    "opencv-doc:right": "an indoor scene with objects on a table",
    "opencv-doc:leuvenA": "a street with old houses",
    "opencv-doc:leuvenB": "a street with old houses",
    "opencv-doc:messi5": "a football player on a pitch",
    "opencv-doc:orange": "an orange",
    "opencv-doc:pca_test1": "several objects on a plain background",
    "opencv-doc:pic2": "a colourful scene with several objects",
    "opencv-doc:rubberwhale1": "toys and objects on a table, with a rubber whale",
    "opencv-doc:rubberwhale2": "toys and objects on a table, with a rubber whale",
    "opencv-doc:squirrel_cls": "a squirrel on a branch",
    "opencv-doc:stuff": "a collection of household objects",
}

PROCEDURAL_CAPTIONS = {
    "dead_leaves": "a dense pattern of overlapping round shapes of many sizes and colours",
    "fractal": "a cloud-like natural texture with irregular colour patches",
    "gradient": "smooth colour gradients with a few soft rounded shapes",
}

GENERIC = "a natural scene"


def safe_content(text: str) -> bool:
    """True when ``text`` names no distortion, severity or rating and has no standalone A/B."""
    return (not parse_distortions(text) and not find_terms(text, RATINGS) and not find_terms(text, SEVERITIES)
            and re.search(r"(?<![\w-])(A|B)(?![\w-])", text) is None)


def _stamp_name(path: str) -> str:
    stem = Path(path).stem
    words = [w for w in re.sub(r"[\d_\-]+", " ", stem).lower().split() if len(w) > 1]
    name = " ".join(words) or "object"
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption(src: SourceImage) -> str:
    """A content phrase for a source ("a red apple"), safe to put in an answer."""
    if src.generator in PROCEDURAL_CAPTIONS:
        text = PROCEDURAL_CAPTIONS[src.generator]
    elif src.generator == "stamp_scene":
        names = [_stamp_name(p) for p in src.stamps]
        text = (", ".join(names[:-1]) + " and " if len(names) > 1 else "") + names[-1] + \
            " placed on a textured background"
    else:
        text = PHOTO_CAPTIONS.get(src.id, GENERIC)
    return text if safe_content(text) else GENERIC
