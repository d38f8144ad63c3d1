"""WebDataset tar shards: writing them (with a manifest) and reading samples back out of them.

A shard set is a directory of `<prefix>-NNNNNN.tar` files plus `manifest.json`:
    {"schema_version": 1, "kind": "image-text", "total": 1200,
     "shards": [{"name": "image-text-000000.tar", "samples": 500}, ...], ...}
Readers size their epochs from the manifest. Each sample is one tar group sharing a key:
`<key>.jpg` (image bytes) and/or `<key>.json` (fields of the kind) and, for image-text, `<key>.txt`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import braceexpand
from webdataset.tariterators import base_plus_ext

SCHEMA_VERSION = 1
KINDS = ("image-text", "dialogue", "keyphrase", "intent")


class DataError(ValueError):
    """Bad data or a bad data path, with a message that names it."""


def write_shards(
    samples: Iterable[Dict[str, Any]],
    out_dir: str | os.PathLike,
    kind: str,
    max_count: int = 1000,
    max_size: float = 1e9,
    extra: Optional[dict] = None,
) -> dict:
    """Write samples (dicts with `__key__` and extension keys) as shards + manifest.

    Written to a temporary directory and renamed into place at the end, so a failure leaves
    nothing behind; an existing non-empty `out_dir` is never written into."""
    import webdataset as wds

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: choose a new output directory")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts: Dict[str, int] = {}
    try:
        with wds.ShardWriter(
            str(tmp / f"{kind}-%06d.tar"), maxcount=max_count, maxsize=max_size, verbose=0
        ) as w:
            for s in samples:
                w.write(s)
                name = Path(w.fname).name
                counts[name] = counts.get(name, 0) + 1
        total = sum(counts.values())
        if total == 0:
            raise DataError("no valid samples: nothing was written")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "total": total,
            "shards": [{"name": n, "samples": c} for n, c in sorted(counts.items())],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
        }
        for leftover in tmp.glob("*.tar"):  # ShardWriter may open one more, empty shard
            if leftover.name not in counts:
                leftover.unlink()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: shard directories need a manifest "
            f"(written by `mmtrain data synth|convert`, or `mmtrain data index DIR` for other shards)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, this mmtrain reads "
            f"{SCHEMA_VERSION}"
        )
    return manifest


def resolve(spec: str | os.PathLike) -> Tuple[List[Path], List[int], dict]:
    """Shard paths and per-shard sample counts from a directory or a brace pattern
    (`dir/x-{000000..000009}.tar`, whose directory holds the manifest)."""
    spec = str(spec)
    if Path(spec).is_dir():
        directory, names = Path(spec), None
    else:
        names = [Path(p) for p in braceexpand.braceexpand(spec)]
        directory = names[0].parent
        missing = [str(p) for p in names if not p.is_file()]
        if missing:
            raise DataError(
                f"shard not found: {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    manifest = read_manifest(directory)
    counts = {s["name"]: int(s["samples"]) for s in manifest["shards"]}
    paths = [directory / n for n in counts] if names is None else names
    for p in paths:
        if p.name not in counts:
            raise DataError(f"{p} is not listed in {directory / 'manifest.json'}")
        if not p.is_file():
            raise DataError(f"shard not found: {p} (listed in {directory / 'manifest.json'})")
    return paths, [counts[p.name] for p in paths], manifest


def iter_shard(
    path: Path, start: int = 0, stop: Optional[int] = None, errors: Optional[List[str]] = None
) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(index in shard, raw sample) for samples start <= index < stop. A truncated or unreadable
    tar ends the shard early with a message appended to `errors` (the caller counts the loss)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exn):
        if errors is not None:
            errors.append(f"{path}: {exn}")
        return False  # stop reading this shard

    try:
        stream = open(path, "rb")
    except OSError as e:
        if errors is not None:
            errors.append(f"{path}: {e}")
        return
    with stream:
        files = tar_file_expander([{"stream": stream, "url": str(path)}], handler=handler)
        for i, sample in enumerate(group_by_keys(files, handler=handler)):
            if stop is not None and i >= stop:
                return
            if i >= start:
                yield i, sample


TAR_BLOCK = 512


class TarFormatError(ValueError):
    """A tar shard whose headers are damaged or cut off."""


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return -n if field[0] & 0x40 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"not a tar header (a number field reads {text[:12]!r})") from None


def _pax_records(data: bytes) -> Dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(fd: int, size: int) -> Iterator[Tuple[str, int, int]]:
    """(name, offset of its data, size) of each regular file of the tar open as `fd` (`size`
    bytes), from its headers alone, each read by itself (`os.pread`): ustar, GNU long names and
    pax headers, which is what tar writers (webdataset's, Python's, GNU tar) produce. Four times
    faster than `tarfile`, whose header objects dominate the index of a shard of small samples."""
    offset, pax, longname = 0, {}, None
    while True:
        if offset + TAR_BLOCK > size:
            if offset >= size:
                if offset == 0:
                    raise TarFormatError("empty file")
                return  # a tar without its end blocks: every member before was whole
            raise TarFormatError(f"a header at byte {offset} is cut off")
        h = os.pread(fd, TAR_BLOCK, offset)
        if h.count(0) == TAR_BLOCK:
            return  # end of archive
        if _tar_number(h[148:156]) != sum(h[:148]) + 256 + sum(h[156:]):
            raise TarFormatError(f"bad header checksum at byte {offset}")
        kind = h[156:157]
        n = _tar_number(h[124:136])
        data = offset + TAR_BLOCK
        if kind in (b"x", b"g", b"L"):
            extra = os.pread(fd, n, data)
            if len(extra) < n:
                raise TarFormatError(f"an extended header at byte {offset} is cut off")
            if kind == b"x":
                try:
                    pax = _pax_records(extra)
                except ValueError:
                    raise TarFormatError(f"a damaged pax header at byte {offset}") from None
            elif kind == b"L":
                longname = extra.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            offset = data + -(-n // TAR_BLOCK) * TAR_BLOCK
            continue
        name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if h[257:262] == b"ustar":
            prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = prefix + "/" + name
        name = pax.get("path", longname or name)
        n = int(pax["size"]) if "size" in pax else n
        pax, longname = {}, None
        if kind in (b"0", b"\0", b"7"):  # a regular file
            if data + n > size:
                raise TarFormatError(f"{name} is cut off")
            yield name, data, n
        offset = data + -(-n // TAR_BLOCK) * TAR_BLOCK


class ShardIndex:
    """Random access to a tar shard's samples: where each sample's files lie, from one pass over the
    tar headers (data is seeked over, not read). Samples are grouped as webdataset groups them
    (consecutive files sharing the name before the first dot; lower-cased extensions). A truncated
    shard indexes the samples before the cut; `error` says what was lost."""

    def __init__(self, path: Path):
        self.path = path
        self.error = None
        self.samples: List[
            Tuple[str, List[Tuple[str, int, int]]]
        ] = []  # (key, [(ext, offset, size)])
        try:
            # each 512-byte header read alone and the members seeked over: a buffered file would
            # read ahead 8 KiB at each header, most of a shard of small images
            fd = os.open(path, os.O_RDONLY)
            try:
                for name, offset, n in tar_members(fd, os.fstat(fd).st_size):
                    if name.startswith("__") and name.endswith("__"):
                        continue
                    key, ext = base_plus_ext(name)
                    if key is None:
                        continue
                    if not self.samples or self.samples[-1][0] != key:
                        self.samples.append((key, []))
                    self.samples[-1][1].append((ext.lower(), offset, n))
            finally:
                os.close(fd)
        except (TarFormatError, OSError) as e:
            self.error = f"{path}: {e}"
            if self.samples:
                self.samples.pop()  # the last sample may be incomplete

    def __len__(self) -> int:
        return len(self.samples)

    def read(
        self, indices: Sequence[int], exts: Optional[Sequence[str]] = None
    ) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """(index, raw sample) for each index that the shard holds, in the given order; with
        `exts`, only those of its files (the others are not read). Unbuffered: a read takes the
        member's bytes alone, not the 8 KiB around them."""
        with open(self.path, "rb", buffering=0) as f:
            for i in indices:
                if i >= len(self.samples):
                    continue
                key, files = self.samples[i]
                sample: Dict[str, Any] = {"__key__": key, "__url__": str(self.path)}
                for ext, offset, n in files:
                    if exts is None or ext in exts:
                        f.seek(offset)
                        sample[ext] = f.read(n)
                yield i, sample


@functools.lru_cache(maxsize=64)
def shard_index(path: Path) -> ShardIndex:
    """The index of a shard, kept for the shards a data worker read last."""
    return ShardIndex(path)


def iter_metas(spec: str | os.PathLike) -> Iterator[Tuple[Path, str, Dict[str, Any]]]:
    """(shard, sample key, its json metadata or {}) for every sample of a shard set, in order.
    Only the tar headers and the `.json` members are read: images are seeked over, so the cost
    is the metadata's size, not the dataset's. A truncated shard gives the samples before the cut
    (with a warning), as the training reader does."""
    paths, _, _ = resolve(spec)
    for p in paths:
        index = ShardIndex(p)
        if index.error:
            logging.getLogger("mmtrain").warning(
                "reading the metadata of %s: %s", spec, index.error
            )
        for _, raw in index.read(range(len(index)), exts=("json",)):
            yield p, raw["__key__"], json.loads(raw["json"]) if "json" in raw else {}


def count_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


def index_shards(directory: str | os.PathLike, kind: str, pattern: str = "*.tar") -> dict:
    """Write a manifest for shards made elsewhere (counts each tar's samples)."""
    d = Path(directory)
    shards = sorted(d.glob(pattern))
    if not shards:
        raise DataError(f"no shards matching {pattern} in {d}")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "shards": [{"name": p.name, "samples": count_samples(p)} for p in shards],
    }
    manifest["total"] = sum(s["samples"] for s in manifest["shards"])
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def sample_key(index: int) -> str:
    return f"{index:09d}"


def split_counts(n: int, fractions: Sequence[float]) -> List[int]:
    sizes = [int(n * f) for f in fractions]
    sizes[0] += n - sum(sizes)
    return sizes
