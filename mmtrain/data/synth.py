"""Procedurally drawn data whose text is true of its image, for the demo and the tests.

Every kind is drawn from a few attributes (shape, colour, count, position; for intents a page
scene) rendered with PIL, so that a model can learn them and the tests can show learning
beyond chance. `mmtrain data synth --kind K --out DIR --n N --seed S` writes DIR/train,
DIR/val and DIR/test (80/10/10), each a shard set with its manifest.

- image-text: "two red circles on the left".
- dialogue: the context names the object, the right response says what only the image shows
  (its colour and count).
- keyphrase: a post whose keyphrases are partly present in the text (the topic, and the shape
  except in the 30% "hard" posts that never name it) and partly absent (the colour, which only
  the image tells), with a teacher-style rationale (10% of them wrong: their answer misses every
  gold keyphrase, for Fine-tune-CoT's filter); the test split also uses shapes never seen in
  training (unseen keyphrases).
- intent: a page-like screenshot (product card, payment, logistics, refund, another app) and a
  customer turn; the intent follows from both (an ambiguous "can you check this?" means
  tracking on a logistics page and a failed payment on a payment page).

`--lang zh` (keyphrase and intent): the same samples in Chinese (posts, keyphrases such as
`圆形`, rationales ending in `答案：`, customer turns such as `我要取消订单。`), and intent labels
spelled as real data spells them, with spaces and capitals (`Payment page`, `Track package`).
"""

from __future__ import annotations

import io
import random
import re
from typing import Any, Callable, Dict, Iterator, List, Tuple

from PIL import Image, ImageDraw

from mmtrain.data.shards import split_counts, write_shards

SIZE = 256
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
TRAIN_SHAPES = ["circle", "square", "triangle"]
UNSEEN_SHAPES = ["star", "hexagon"]  # keyphrase test split only
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
HARD_KEYPHRASE = 0.3  # keyphrase posts whose text omits the shape
WRONG_RATIONALE = 0.1  # keyphrase rationales whose answer is wrong (to be filtered)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _polygon(cx, cy, r, sides, rot=0.0, star=False):
    import math

    pts = []
    n = sides * (2 if star else 1)
    for k in range(n):
        rr = r * (0.45 if star and k % 2 else 1.0)
        a = rot + 2 * math.pi * k / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    import math

    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, -math.pi / 2, star=True), fill=fill)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6), fill=fill)
    else:
        raise ValueError(shape)


def shapes_image(
    rng: random.Random, shape: str, color: str, count: int, position: str
) -> Image.Image:
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):  # distractor strokes, no meaning
        d.line(
            [tuple(rng.randint(0, SIZE) for _ in range(2)) for _ in range(2)],
            fill=tuple(rng.randint(120, 200) for _ in range(3)),
            width=2,
        )
    px, py = POSITIONS[position]
    r = SIZE * 0.09
    for k in range(count):
        off = (k - (count - 1) / 2) * 2.6 * r
        cx, cy = (
            (px * SIZE + off, py * SIZE)
            if position in ("top", "bottom")
            else (px * SIZE, py * SIZE + off)
        )
        draw_shape(
            d,
            shape,
            cx + rng.uniform(-4, 4),
            cy + rng.uniform(-4, 4),
            r * rng.uniform(0.85, 1.1),
            COLORS[color],
        )
    return img


def _attrs(rng: random.Random, shapes: List[str]) -> Tuple[str, str, int, str]:
    return (
        rng.choice(shapes),
        rng.choice(list(COLORS)),
        rng.randint(1, 3),
        rng.choice(list(POSITIONS)),
    )


def _noun(shape: str, count: int) -> str:
    return shape + ("es" if shape.endswith("x") else "s") if count > 1 else shape


def image_text(rng: random.Random, split: str) -> Dict[str, Any]:
    shape, color, count, pos = _attrs(rng, TRAIN_SHAPES)
    caption = f"{COUNT_WORDS[count]} {color} {_noun(shape, count)} on the {pos}"
    return {
        "jpg": _jpeg(shapes_image(rng, shape, color, count, pos)),
        "txt": caption,
        "json": {
            "caption": caption,
            "shape": shape,
            "color": color,
            "count": count,
            "position": pos,
        },
    }


def dialogue(rng: random.Random, split: str) -> Dict[str, Any]:
    shape, color, count, pos = _attrs(rng, TRAIN_SHAPES)
    opener = rng.choice(
        ["Look at the picture I made.", "I just finished a drawing.", "Here is my sketch."]
    )
    question = rng.choice(
        [
            f"What do the {shape}s on the {pos} look like?",
            f"Tell me about the {shape}s.",
            f"Describe the {shape}s you see.",
        ]
    )
    response = (
        f"There {'is' if count == 1 else 'are'} {COUNT_WORDS[count]} {color} {_noun(shape, count)}."
    )
    return {
        "jpg": _jpeg(shapes_image(rng, shape, color, count, pos)),
        "json": {
            "context": [opener, question],
            "response": response,
            "shape": shape,
            "color": color,
            "count": count,
        },
    }


def keyphrase(rng: random.Random, split: str) -> Dict[str, Any]:
    shapes = UNSEEN_SHAPES + TRAIN_SHAPES[:1] if split == "test" else TRAIN_SHAPES
    shape, color, count, pos = _attrs(rng, shapes)
    topic = rng.choice(["art", "design", "weekend"])
    if rng.random() < HARD_KEYPHRASE:  # the text never names the shape: only the picture tells it
        text = rng.choice(
            [f"Look what I made for the {topic} board!", f"Some new {topic} to share."]
        )
    else:
        text = rng.choice(
            [
                f"Finished my {shape} {topic} project today!",
                f"New {shape} piece for my {topic} board.",
                f"Some {shape} {topic} to share.",
            ]
        )
    kps = [shape, color, topic]  # topic present, colour absent, shape present unless hard
    seen_color, seen_shape, answer = color, shape, kps
    # a teacher's mistake: its answer misses every gold keyphrase
    if rng.random() < WRONG_RATIONALE:
        seen_color = rng.choice([c for c in COLORS if c != color])
        seen_shape = rng.choice([s for s in TRAIN_SHAPES if s != shape])
        answer = [seen_color, seen_shape]
    rationale = (
        f"The image shows {COUNT_WORDS[count]} {seen_color} {_noun(seen_shape, count)} and the post is "
        f"about {topic}. Answer: {'; '.join(answer)}"
    )
    return {
        "jpg": _jpeg(shapes_image(rng, shape, color, count, pos)),
        "json": {"text": text, "keyphrases": kps, "rationale": rationale},
    }


SCENES = ["product", "payment", "logistics", "refund", "other_app"]
AMBIGUOUS_INTENT = {
    "product": "product_detail",
    "payment": "payment_issue",
    "logistics": "track_package",
    "refund": "refund_status",
    "other_app": "other_app_issue",
}


def scene_image(rng: random.Random, scene: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (248, 248, 248))
    d = ImageDraw.Draw(img)
    header = {
        "product": (255, 120, 0),
        "payment": (30, 150, 80),
        "logistics": (40, 100, 200),
        "refund": (200, 40, 40),
        "other_app": (90, 90, 90),
    }[scene]
    d.rectangle([0, 0, SIZE, 28], fill=header)
    for k in range(rng.randint(3, 6)):  # text-like lines
        y = 40 + 26 * k
        d.rectangle([14, y, 14 + rng.randint(60, 200), y + 8], fill=(170, 170, 170))
    if scene == "product":
        d.rectangle([60, 70, 196, 180], fill=tuple(rng.randint(60, 220) for _ in range(3)))
        d.rectangle([150, 190, 240, 215], fill=(255, 80, 0))  # price tag
    elif scene == "payment":
        d.rounded_rectangle([50, 80, 206, 170], radius=10, fill=(30, 60, 140))  # a card
        d.rectangle([50, 100, 206, 115], fill=(20, 20, 20))
        d.rectangle([40, 200, 216, 228], fill=(30, 150, 80))  # pay button
    elif scene == "logistics":
        d.rectangle([60, 110, 150, 160], fill=(40, 100, 200))  # a truck
        d.rectangle([150, 125, 190, 160], fill=(40, 100, 200))
        for cx in (85, 170):
            d.ellipse([cx - 12, 152, cx + 12, 176], fill=(30, 30, 30))
        d.line([20, 200, 236, 200], fill=(40, 100, 200), width=4)  # tracking line
    elif scene == "refund":
        # a back arrow
        d.polygon(
            [(70, 130), (120, 90), (120, 115), (190, 115), (190, 145), (120, 145), (120, 170)],
            fill=(200, 40, 40),
        )
    else:
        for k, x in enumerate((30, 90, 40)):  # chat bubbles
            d.rounded_rectangle(
                [x, 70 + 45 * k, x + 130, 100 + 45 * k],
                radius=12,
                fill=(120, 200, 120) if k % 2 else (210, 210, 210),
            )
    return img


def intent(rng: random.Random, split: str) -> Dict[str, Any]:
    scene = rng.choice(SCENES)
    kind = rng.choices(["ambiguous", "price", "cancel"], weights=[3, 1, 1])[0]
    if kind == "ambiguous":
        text = rng.choice(
            [
                "Can you check this for me?",
                "What is going on here?",
                "Please help me with this.",
                "I have a question about this page.",
            ]
        )
        label = AMBIGUOUS_INTENT[scene]
    elif kind == "price":
        text, label = (
            rng.choice(["How much does this cost?", "Is there a discount on this?"]),
            "ask_price",
        )
    else:
        text, label = (
            rng.choice(["I want to cancel my order.", "Please cancel it."]),
            "cancel_order",
        )
    turns = [
        {"role": "user", "text": rng.choice(["Hi.", "Hello there.", "Good morning."])},
        {"role": "agent", "text": "Hello! How can I help you?"},
        {"role": "user", "text": text},
    ]
    return {
        "jpg": _jpeg(scene_image(rng, scene)),
        "json": {"turns": turns, "scene": scene, "intent": label},
    }


# -- the Chinese variant -----------------------------------------------------------------------
ZH = {
    "circle": "圆形",
    "square": "方形",
    "triangle": "三角形",
    "star": "星形",
    "hexagon": "六边形",
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
    "art": "艺术",
    "design": "设计",
    "weekend": "周末",
}
ZH_COUNT = {1: "一", 2: "两", 3: "三"}
ZH_SCENES = {  # as real label sets spell them
    "product": "Product page",
    "payment": "Payment page",
    "logistics": "Logistics",
    "refund": "Refund",
    "other_app": "Other app",
}


def keyphrase_zh(rng: random.Random, split: str) -> Dict[str, Any]:
    """`keyphrase` in Chinese: the same draws, so the same images and keyphrase structure."""
    sample = keyphrase(rng, split)
    shape, color, topic = (ZH[k] for k in sample["json"]["keyphrases"])
    en = sample["json"]
    if any(w in en["text"] for w in TRAIN_SHAPES + UNSEEN_SHAPES):
        text = f"今天完成了我的{shape}{topic}作品！"
    else:
        text = f"看看我为{topic}板做的东西！"
    answer = re.search(r"Answer: (.*)$", en["rationale"]).group(1).split("; ")
    seen = [ZH[a] for a in answer]
    said = "、".join(seen[:2])
    rationale = f"图片里是{said}，帖子是关于{topic}的。答案：{'；'.join(seen)}"
    return {
        **sample,
        "json": {"text": text, "keyphrases": [shape, color, topic], "rationale": rationale},
    }


def intent_zh(rng: random.Random, split: str) -> Dict[str, Any]:
    """`intent` in Chinese, its labels spelled with spaces and capitals."""
    sample = intent(rng, split)
    en = sample["json"]
    if en["intent"] == "ask_price":
        text = rng.choice(["这个多少钱？", "这个有折扣吗？"])
    elif en["intent"] == "cancel_order":
        text = rng.choice(["我要取消订单。", "请帮我取消。"])
    else:
        text = rng.choice(["帮我看看这个。", "这是怎么回事？", "我对这个页面有疑问。"])
    turns = [
        {"role": "user", "text": rng.choice(["你好。", "在吗？"])},
        {"role": "agent", "text": "您好！请问有什么可以帮您？"},
        {"role": "user", "text": text},
    ]
    label = en["intent"].replace("_", " ").capitalize()
    return {**sample, "json": {"turns": turns, "scene": ZH_SCENES[en["scene"]], "intent": label}}


GENERATORS: Dict[str, Callable[[random.Random, str], Dict[str, Any]]] = {
    "image-text": image_text,
    "dialogue": dialogue,
    "keyphrase": keyphrase,
    "intent": intent,
}
ZH_GENERATORS = {"keyphrase": keyphrase_zh, "intent": intent_zh}
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def samples(kind: str, n: int, seed: int, split: str, lang: str = "en") -> Iterator[Dict[str, Any]]:
    gen = ZH_GENERATORS[kind] if lang == "zh" else GENERATORS[kind]
    for i in range(n):
        rng = random.Random(f"{seed}/{kind}/{split}/{i}")
        yield {"__key__": f"{split}-{i:09d}", **gen(rng, split)}


def synth(
    kind: str, out_dir: str, n: int, seed: int = 0, max_count: int = 1000, lang: str = "en"
) -> Dict[str, dict]:
    from pathlib import Path

    if kind not in GENERATORS:
        raise ValueError(f"--kind must be one of {sorted(GENERATORS)}, got {kind!r}")
    if lang not in ("en", "zh") or (lang == "zh" and kind not in ZH_GENERATORS):
        raise ValueError(
            f"--lang {lang}: the Chinese variant exists for --kind {sorted(ZH_GENERATORS)}"
        )
    manifests = {}
    for (split, _), size in zip(SPLITS, split_counts(n, [f for _, f in SPLITS])):
        if size:
            manifests[split] = write_shards(
                samples(kind, size, seed, split, lang),
                Path(out_dir) / split,
                kind,
                max_count=max_count,
                extra={"source": f"synth seed={seed} lang={lang}", "split": split},
            )
    return manifests
