"""Converters from the formats public datasets ship in to mmtrain shard sets.

    --from image-caption-jsonl   {"image": path, "caption": text} per line
    --from coco                  COCO captions JSON (images + annotations), one sample per caption
    --from dialogue-jsonl        {"context": [turns], "response": text, "image"?: path} per line
                                 (Reddit exports), or Image-Chat's {"image"|"image_hash": ...,
                                 "dialog": [[speaker, text], ...]}
    --from keyphrase-lines       text<sep>kp1;kp2<sep>image per line (the classic MMKP layout)
    --from keyphrase-jsonl       {"text", "keyphrases": [..] | "kp1;kp2", "image", "rationale"?} per line
    --from llava-intent          LLaVA-style conversation JSON: [{"id", "image", "conversations":
                                 [{"from", "value"}], "scene", "intent"}], `<image>` tags stripped
Image paths are relative to --image-root (default: the input file's directory). A missing image,
an unreadable image or a malformed record is skipped and listed in the report (count, reasons,
first examples with file and line); zero valid samples is an error and writes nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from mmtrain.data.shards import DataError, write_shards

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class Skip(Exception):
    """A record that cannot become a sample; the message is the reason in the report."""


class Report:
    def __init__(self, max_examples: int = 20):
        self.read = 0
        self.reasons: Counter = Counter()
        self.examples: List[Dict[str, Any]] = []
        self.max_examples = max_examples

    def skip(self, file: Path, line: int, reason: str) -> None:
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"file": str(file), "line": line, "reason": reason})

    def as_dict(self, written: int) -> Dict[str, Any]:
        return {
            "read": self.read,
            "written": written,
            "skipped": sum(self.reasons.values()),
            "reasons": dict(self.reasons),
            "examples": self.examples,
        }


def load_image(root: Path, rel: Any) -> Tuple[str, bytes]:
    """(extension key, bytes) of a readable image, or Skip."""
    from PIL import Image

    if not isinstance(rel, str) or not rel:
        raise Skip("bad image field: expected a path string")
    path = root / rel
    ext = IMAGE_EXTS.get(path.suffix.lower())
    if ext is None:
        raise Skip(f"unsupported image type: {path.suffix or 'no extension'} ({path})")
    if not path.is_file():
        raise Skip(f"missing image: {path}")
    data = path.read_bytes()
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:
        raise Skip(f"unreadable image: {path} ({type(e).__name__})") from None
    return ext, data


def _jsonl(path: Path) -> Iterator[Tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, Skip(f"malformed JSON: {e.msg}")


def _text(rec: Dict[str, Any], key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise Skip(f"missing field: '{key}' must be a non-empty string")
    return v.strip()


def _record(rec: Any) -> Dict[str, Any]:
    if isinstance(rec, Skip):
        raise rec
    if not isinstance(rec, dict):
        raise Skip(f"malformed record: expected an object, got {type(rec).__name__}")
    return rec


# ------------------------------------------------------------------------- per format


def image_caption_jsonl(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for n, rec in _jsonl(path):

        def build(rec=rec):
            rec = _record(rec)
            caption = _text(rec, "caption")
            ext, data = load_image(root, rec.get("image"))
            return {ext: data, "txt": caption, "json": {"caption": caption, "image": rec["image"]}}

        yield n, build


def coco(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{path} is not a COCO captions file (needs 'images' and 'annotations'): {e}"
        ) from None
    for n, ann in enumerate(annotations, 1):

        def build(ann=ann):
            ann = _record(ann)
            caption = _text(ann, "caption")
            if ann.get("image_id") not in images:
                raise Skip(f"unknown image_id: {ann.get('image_id')!r}")
            ext, data = load_image(root, images[ann["image_id"]])
            return {
                ext: data,
                "txt": caption,
                "json": {"caption": caption, "image": images[ann["image_id"]]},
            }

        yield n, build


def dialogue_jsonl(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for n, rec in _jsonl(path):

        def build(rec=rec):
            rec = _record(rec)
            if "dialog" in rec:  # Image-Chat
                turns = [t[-1] if isinstance(t, (list, tuple)) else t for t in rec["dialog"]]
                if len(turns) < 2 or not all(isinstance(t, str) and t.strip() for t in turns):
                    raise Skip("malformed dialog: needs at least two non-empty turns")
                context, response = turns[:-1], turns[-1]
            else:
                context, response = rec.get("context"), _text(rec, "response")
                if isinstance(context, str):
                    context = [context]
                if (
                    not isinstance(context, list)
                    or not context
                    or not all(isinstance(t, str) for t in context)
                ):
                    raise Skip("missing field: 'context' must be a non-empty list of turns")
            sample: Dict[str, Any] = {
                "json": {"context": [t.strip() for t in context], "response": response.strip()}
            }
            image = rec.get("image") or rec.get("image_hash")
            if image:
                if "." not in Path(image).name:
                    image = image + ".jpg"  # Image-Chat names images by hash
                ext, data = load_image(root, image)
                sample[ext] = data
            return sample

        yield n, build


def _keyphrase_sample(
    text: str, kps: Any, image: Any, root: Path, rationale: Optional[str]
) -> Dict[str, Any]:
    if isinstance(kps, str):
        kps = kps.split(";")
    if not isinstance(kps, list):
        raise Skip("malformed keyphrases: expected a list or 'kp1;kp2'")
    kps = [k.strip() for k in kps if isinstance(k, str) and k.strip()]
    if not kps:
        raise Skip("missing keyphrases: none given")
    ext, data = load_image(root, image)
    meta = {"text": text, "keyphrases": kps}
    if rationale:
        meta["rationale"] = rationale
    return {ext: data, "json": meta}


def keyphrase_lines(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    rationales = _rationales(opts.rationales)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue

            def build(line=line, n=n):
                parts = line.rstrip("\n").split(opts.sep)
                if len(parts) != 3:
                    raise Skip(
                        f"malformed line: expected text{opts.sep}keyphrases{opts.sep}image, "
                        f"got {len(parts)} fields"
                    )
                text, kps, image = (p.strip() for p in parts)
                if not text:
                    raise Skip("missing field: empty text")
                return _keyphrase_sample(text, kps, image, root, rationales.get(str(n)))

            yield n, build


def keyphrase_jsonl(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    rationales = _rationales(opts.rationales)
    for n, rec in _jsonl(path):

        def build(rec=rec, n=n):
            rec = _record(rec)
            rid = str(rec.get("id", n))
            return _keyphrase_sample(
                _text(rec, "text"),
                rec.get("keyphrases"),
                rec.get("image"),
                root,
                rec.get("rationale") or rationales.get(rid),
            )

        yield n, build


def llava_intent(path: Path, root: Path, opts) -> Iterator[Tuple[int, Dict[str, Any]]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of conversations")
    for n, rec in enumerate(records, 1):

        def build(rec=rec):
            rec = _record(rec)
            conv = rec.get("conversations")
            if not isinstance(conv, list) or not conv:
                raise Skip("missing field: 'conversations' must be a non-empty list")
            turns = []
            for t in conv:
                if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                    raise Skip("malformed turn: expected {'from': ..., 'value': text}")
                role = "user" if t.get("from") in ("human", "user") else "agent"
                text = re.sub(r"\s*<image>\s*", " ", t["value"]).strip()
                if text:
                    turns.append({"role": role, "text": text})
            meta = {"turns": turns, "scene": _text(rec, "scene"), "intent": _text(rec, "intent")}
            ext, data = load_image(root, rec.get("image"))
            return {ext: data, "json": meta}

        yield n, build


def _rationales(path: Optional[str]) -> Dict[str, str]:
    """Teacher rationales keyed by sample id (the JSONL 'id' field, or the 1-based line number)."""
    if not path:
        return {}
    out = {}
    for n, rec in _jsonl(Path(path)):
        if isinstance(rec, dict) and isinstance(rec.get("rationale"), str):
            out[str(rec.get("id", n))] = rec["rationale"]
    return out


FORMATS: Dict[str, Tuple[str, Callable]] = {
    "image-caption-jsonl": ("image-text", image_caption_jsonl),
    "coco": ("image-text", coco),
    "dialogue-jsonl": ("dialogue", dialogue_jsonl),
    "keyphrase-lines": ("keyphrase", keyphrase_lines),
    "keyphrase-jsonl": ("keyphrase", keyphrase_jsonl),
    "llava-intent": ("intent", llava_intent),
}


def convert(
    fmt: str,
    inputs: List[str],
    out_dir: str,
    image_root: Optional[str] = None,
    opts=None,
    max_count: int = 1000,
    max_size: float = 1e9,
) -> Dict[str, Any]:
    """Convert; returns the manifest (its 'report' holds what was skipped and why)."""
    if fmt not in FORMATS:
        raise DataError(f"--from must be one of {sorted(FORMATS)}, got {fmt!r}")
    kind, reader = FORMATS[fmt]
    report = Report()
    for f in inputs:
        if not Path(f).is_file():
            raise DataError(f"input file not found: {f}")

    def samples():
        i = 0
        for f in map(Path, inputs):
            root = Path(image_root) if image_root else f.parent
            for line, build in reader(f, root, opts):
                report.read += 1
                try:
                    sample = build()
                except Skip as e:
                    report.skip(f, line, str(e))
                    continue
                yield {"__key__": f"{i:09d}", **sample}
                i += 1

    try:
        manifest = write_shards(
            samples(),
            out_dir,
            kind,
            max_count=max_count,
            max_size=max_size,
            extra={
                "source": f"convert --from {fmt}",
                "inputs": [str(Path(f).resolve()) for f in inputs],
            },
        )
    except DataError as e:
        if "no valid samples" in str(e):
            first = "; ".join(
                f"{x['file']}:{x['line']}: {x['reason']}" for x in report.examples[:3]
            )
            raise DataError(
                f"no valid samples in {report.read} records ({dict(report.reasons)}); nothing written. "
                f"First problems: {first or 'the input is empty'}"
            ) from None
        raise
    manifest["report"] = report.as_dict(manifest["total"])
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
