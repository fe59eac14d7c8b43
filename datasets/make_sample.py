"""Generate `datasets/sample/`: a tiny gallery-dl style dataset of one made-up character.

Run from the repository root: `python datasets/make_sample.py`. Deterministic (fixed seeds, no
timestamps in the files), so re-running reproduces the committed images byte for byte.

Each image is a simple drawing of "mira_(animagine_sample)" (copyright "animagine_sample"):
long blue hair, yellow eyes, a hair ornament; background, shirt colour, expression and framing
vary. Each has a Danbooru-style `.json` sidecar named the way `gallery-dl --write-metadata`
names them (`danbooru_<id>_<md5>.<ext>.json`), with tag_string_* fields, rating, score,
created_at and media_asset.created_at. `datasets/sample.toml` is the recipe the demo uses.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "sample"
HAIR, SKIN, EYES = (70, 110, 200), (252, 226, 210), (230, 180, 40)
BACKGROUNDS = {
    "white_background": (255, 255, 255),
    "blue_background": (150, 190, 235),
    "yellow_background": (245, 225, 130),
}
SHIRTS = {"white_shirt": (245, 245, 245), "red_shirt": (200, 50, 60), "blue_shirt": (60, 80, 170)}
SIZES = [
    (768, 768),
    (640, 896),
    (896, 640),
    (576, 1024),
    (1024, 576),
    (704, 832),
    (832, 704),
    (512, 768),
]
RATINGS = ["g", "g", "g", "s"]


def draw(width: int, height: int, rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One picture and the general tags that describe it."""
    background = rng.choice(sorted(BACKGROUNDS))
    shirt = rng.choice(sorted(SHIRTS))
    smiling = rng.random() < 0.6
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    cx, head = width // 2 + rng.randint(-width // 10, width // 10), min(width, height) // 4
    cy = height // 2 - head // 2
    # Hair behind the head, long: down to the shoulders and past them.
    pen.rounded_rectangle(
        [cx - head * 1.3, cy - head * 1.2, cx + head * 1.3, cy + head * 2.6], radius=head, fill=HAIR
    )
    # Body (shirt) as a trapezoid from the neck to the bottom edge.
    pen.polygon(
        [
            (cx - head * 0.5, cy + head),
            (cx + head * 0.5, cy + head),
            (cx + head * 1.8, height),
            (cx - head * 1.8, height),
        ],
        fill=SHIRTS[shirt],
    )
    pen.ellipse([cx - head, cy - head, cx + head, cy + head], fill=SKIN)
    # Blunt bangs across the forehead.
    pen.chord(
        [cx - head * 1.05, cy - head * 1.15, cx + head * 1.05, cy + head * 0.2], 180, 360, fill=HAIR
    )
    for side in (-1, 1):
        ex = cx + side * head * 0.4
        pen.ellipse([ex - head * 0.16, cy, ex + head * 0.16, cy + head * 0.36], fill=EYES)
        pen.ellipse(
            [ex - head * 0.07, cy + head * 0.1, ex + head * 0.07, cy + head * 0.3],
            fill=(40, 30, 20),
        )
    mouth = [cx - head * 0.25, cy + head * 0.45, cx + head * 0.25, cy + head * 0.7]
    if smiling:
        pen.arc(mouth, 20, 160, fill=(150, 60, 60), width=max(2, head // 25))
    else:
        pen.line(
            [
                mouth[0] + head * 0.1,
                mouth[1] + head * 0.15,
                mouth[2] - head * 0.1,
                mouth[1] + head * 0.15,
            ],
            fill=(150, 60, 60),
            width=max(2, head // 25),
        )
    # Hair ornament: a small star-like diamond on the right of the bangs.
    ox, oy = cx + head * 0.7, cy - head * 0.6
    pen.polygon([(ox, oy - 18), (ox + 14, oy), (ox, oy + 18), (ox - 14, oy)], fill=(250, 240, 120))
    tags = [
        "1girl",
        "solo",
        "long_hair",
        "blue_hair",
        "yellow_eyes",
        "hair_ornament",
        "blunt_bangs",
        "looking_at_viewer",
        "upper_body",
        "shirt",
        shirt,
        background,
        "smile" if smiling else "closed_mouth",
    ]
    if background == "white_background":
        tags.append("simple_background")
    return image, sorted(set(tags))


def main(count: int = 14) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.iterdir():
        stale.unlink()
    for index in range(count):
        rng = random.Random(1000 + index)
        width, height = SIZES[index % len(SIZES)]
        image, general = draw(width, height, rng)
        post_id = 9_000_001 + index
        extension = "jpg" if index % 3 == 2 else "png"
        encoded = _encode(image, extension)
        md5 = hashlib.md5(encoded).hexdigest()
        name = f"danbooru_{post_id}_{md5}.{extension}"
        (OUT / name).write_bytes(encoded)
        year, month = 2021 + index % 4, 1 + index % 12
        created = f"{year}-{month:02d}-{10 + index:02d}T12:00:00.000-05:00"
        post = {
            "id": post_id,
            "category": "danbooru",
            "md5": md5,
            "file_ext": extension,
            "image_width": width,
            "image_height": height,
            "rating": RATINGS[index % len(RATINGS)],
            "score": rng.randint(3, 160),
            "created_at": created,
            "media_asset": {"created_at": created, "image_width": width, "image_height": height},
            "tag_string_general": " ".join(general),
            "tag_string_character": "mira_(animagine_sample)",
            "tag_string_copyright": "animagine_sample",
            "tag_string_artist": "",
            "tag_string_meta": "",
        }
        post["tag_string"] = " ".join(
            t
            for k in ("general", "character", "copyright", "artist", "meta")
            for t in post[f"tag_string_{k}"].split()
        )
        (OUT / f"{name}.json").write_text(json.dumps(post, indent=1) + "\n", encoding="utf-8")


def _encode(image: Image.Image, extension: str) -> bytes:
    import io

    buffer = io.BytesIO()
    if extension == "jpg":
        image.save(buffer, "JPEG", quality=85)
    else:
        image.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, "PNG", optimize=True
        )
    return buffer.getvalue()


if __name__ == "__main__":
    main()
