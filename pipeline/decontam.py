"""Decontamination: training images checked against the benchmark images a model will be judged on.

A benchmark is a folder the user names (recipe ``decontamination.against``, or ``dynaip manifest
contamination --against``): DreamBench++ in its published layout (``images/live_subject/animal/00.jpg``
... beside ``captions/``), a DynaIP-Bench subject pool (``POOL/<type>/<name>.jpg``) or any folder of
images. Every image file under the root is a benchmark image (captions and other files are not
images and are left alone), named by its path relative to the root. Only files inside the root are
read: a link that leads out of it, a link to a folder, or a special file with an image extension is an
error naming it (docs/security.md), as is an image that does not decode — a benchmark image that
cannot be read is one the data would not be checked against.

The matcher (``BenchmarkIndex.match``), shared by the curation stage and the report:

- **copies** (resized, re-encoded): the pHash of the image is within ``max_distance`` bits of a
  benchmark image's and — the second check the de-duplication also makes (pipeline/dedup.py) — no value
  of the two 8×8 RGB thumbnails differs by more than ``max_thumb_diff``;
- **crops and light edits**: the cosine of the two OpenCLIP image embeddings (models.yaml
  ``clip_vision``) is at least ``min_similarity``.

The index is small (DreamBench++ holds 150 images), so each worker builds it once and compares every
image with every benchmark image.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dynaip.configs import ConfigError
from pipeline.sources.folder import IMAGE_EXTS

DREAMBENCH_TREES = ("images", "captions")
"""A DreamBench++ root holds both (dynaip/eval/bench_single.py reads the same layout)."""
POOL_TYPES = ("living", "object", "human", "character", "upwearing", "midwearing", "wholewearing", "downwearing")
"""The subject-type folders of a DynaIP-Bench pool (dynaip/eval/bench_multi.py, ``SUBJECT_TYPES``)."""
REASON = "contaminated: {what} matches benchmark image {rel} of {root} ({how})"
REASON_RE = re.compile(r"^contaminated: .+? matches benchmark image (?P<rel>.+?) of (?P<root>.+) \((?P<how>[^()]*)\)$")

Embed = Callable[[Sequence[np.ndarray]], np.ndarray]
"""Images ``(H, W, 3) uint8`` → ``(n, D)`` embeddings (any norm)."""


@dataclass(frozen=True)
class BenchmarkFile:
    rel: str
    """Path relative to the benchmark root (``/``-separated)."""
    path: str
    """Where its bytes are read (inside the root)."""
    sha256: str


@dataclass(frozen=True)
class Benchmark:
    """One benchmark root as listed: its images and what identifies its content."""

    root: str
    """The root, absolute with its own symlinks resolved (the user's path; its inside is not trusted)."""
    layout: str
    """``dreambench++``, ``dynaip-bench`` or ``folder``."""
    files: tuple[BenchmarkFile, ...]

    @property
    def sha256(self) -> str:
        """Content hash: sha256 over every image's relative path and sha256, in path order."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.rel}\t{f.sha256}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"path": self.root, "layout": self.layout, "files": len(self.files), "sha256": self.sha256}


def benchmark_layout(root: Path) -> str:
    if all((root / t).is_dir() and not (root / t).is_symlink() for t in DREAMBENCH_TREES):
        return "dreambench++"
    if any((root / t).is_dir() for t in POOL_TYPES):
        return "dynaip-bench"
    return "folder"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def list_benchmark(root: str | Path) -> Benchmark:
    """The image files of the benchmark at ``root`` (hashed). ConfigError for a root that is no folder,
    holds no image, or holds a link out of it, a link to a folder or a special file named as an image."""
    real = os.path.realpath(os.path.expanduser(str(root)))
    if not os.path.isdir(real):
        raise ConfigError(
            f"decontamination benchmark '{root}' is not a folder; give the root of DreamBench++ "
            "(holding images/ and captions/), of a DynaIP-Bench pool, or of a folder of images"
        )
    files: list[BenchmarkFile] = []
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                raise ConfigError(
                    f"decontamination benchmark '{real}': {os.path.relpath(p, real)} is a link to a "
                    "folder; links are not followed (copy the folder into the benchmark root)"
                )
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                continue
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, real).replace(os.sep, "/")
            target = os.path.realpath(p)
            if not _inside(target, real):
                raise ConfigError(
                    f"decontamination benchmark '{real}': {rel} is a link to {target}, outside the "
                    "benchmark root; only files inside it are read (copy the file in)"
                )
            st = os.stat(target)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"decontamination benchmark '{real}': {rel} is not a regular file")
            with open(target, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files.append(BenchmarkFile(rel=rel, path=target, sha256=digest))
    if not files:
        raise ConfigError(
            f"decontamination benchmark '{real}' holds no image file ({', '.join(sorted(IMAGE_EXTS))}); "
            "is it the benchmark's root?"
        )
    files.sort(key=lambda f: f.rel)
    return Benchmark(root=real, layout=benchmark_layout(Path(real)), files=tuple(files))


def list_benchmarks(roots: Sequence[str]) -> list[Benchmark]:
    benchmarks = [list_benchmark(r) for r in roots]
    seen: dict[str, str] = {}
    for b, r in zip(benchmarks, roots):
        if b.root in seen:
            raise ConfigError(f"decontamination benchmark '{r}' is named twice (also as '{seen[b.root]}')")
        seen[b.root] = r
    return benchmarks


def benchmarks_fingerprint(benchmarks: Sequence[Benchmark]) -> str:
    """What every chunk's fingerprint takes in: the benchmarks' content (not where they lie)."""
    return hashlib.sha256("|".join(sorted(b.sha256 for b in benchmarks)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the matcher


@dataclass(frozen=True)
class Match:
    root: str
    rel: str
    how: str
    """``pHash distance 3, thumbnail difference 4`` or ``embedding cosine 0.9931``."""

    def reason(self, what: str) -> str:
        return REASON.format(what=what, rel=self.rel, root=self.root, how=self.how)


def matched_root(reason: str) -> str | None:
    """The benchmark root a ``decontamination`` reject reason names (None for another reason)."""
    m = REASON_RE.match(reason)
    return m.group("root") if m else None


def _hash_words(images: Sequence[np.ndarray], hash_size: int) -> np.ndarray:
    from pipeline.dedup import image_hash, words_per_hash

    w = words_per_hash(hash_size)
    raw = b"".join(int(image_hash(im, hash_size), 16).to_bytes(8 * w, "big") for im in images)
    return np.frombuffer(raw, dtype=">u8").reshape(len(images), w).astype(np.uint64)


def _thumbs(images: Sequence[np.ndarray]) -> np.ndarray:
    from pipeline.dedup import THUMB, image_thumb

    raw = b"".join(bytes.fromhex(image_thumb(im)) for im in images)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(images), 3 * THUMB * THUMB)


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.where(n > 0, n, 1.0)


def read_benchmark_image(b: Benchmark, f: BenchmarkFile) -> np.ndarray:
    from pipeline.stages.decode import DecodeError, decode_image

    try:
        with open(f.path, "rb") as fh:
            return decode_image(fh.read())
    except DecodeError as e:
        raise ConfigError(f"decontamination benchmark '{b.root}': {f.rel} is not a readable image ({e})") from None


@dataclass
class BenchmarkIndex:
    """Every benchmark image's pHash, thumbnail and (when an embedder is given) embedding."""

    names: list[tuple[str, str]]
    """``(root, relative path)`` per row."""
    words: np.ndarray
    thumbs: np.ndarray
    emb: np.ndarray | None
    max_distance: int | None
    hash_size: int
    max_thumb_diff: float | None
    min_similarity: float | None

    @classmethod
    def build(
        cls,
        benchmarks: Sequence[Benchmark],
        *,
        max_distance: int | None,
        hash_size: int,
        max_thumb_diff: float | None,
        min_similarity: float | None,
        embed: Embed | None = None,
        batch: int = 16,
    ) -> BenchmarkIndex:
        names, words, thumbs, emb = [], [], [], []
        for b in benchmarks:
            for s in range(0, len(b.files), batch):
                part = b.files[s : s + batch]
                images = [read_benchmark_image(b, f) for f in part]
                names.extend((b.root, f.rel) for f in part)
                if max_distance is not None:
                    words.append(_hash_words(images, hash_size))
                    thumbs.append(_thumbs(images))
                if min_similarity is not None and embed is not None:
                    emb.append(_unit(embed(images)))
        if min_similarity is not None and embed is None:
            raise ValueError("the embedding check (min_similarity) needs an embedder")
        return cls(
            names,
            np.concatenate(words) if words else np.zeros((0, 1), np.uint64),
            np.concatenate(thumbs) if thumbs else np.zeros((0, 192), np.uint8),
            np.concatenate(emb) if emb else None,
            max_distance,
            hash_size,
            max_thumb_diff,
            min_similarity,
        )

    def match(self, images: Sequence[np.ndarray], embed: Embed | None = None) -> list[Match | None]:
        """Per image, the benchmark image it copies (the closest pHash match first, else the most similar
        embedding at or above ``min_similarity``), or None."""
        out: list[Match | None] = [None] * len(images)
        if not images or not self.names:
            return out
        if self.max_distance is not None:
            q = _hash_words(images, self.hash_size)
            dist = np.bitwise_count(q[:, None, :] ^ self.words[None, :, :]).sum(axis=2, dtype=np.int64)
            ok = dist <= self.max_distance
            if self.max_thumb_diff is not None:
                t = _thumbs(images).astype(np.int16)
                tdiff = np.abs(t[:, None, :] - self.thumbs[None, :, :].astype(np.int16)).max(axis=2)
                ok &= tdiff <= self.max_thumb_diff
            for i in np.flatnonzero(ok.any(axis=1)):
                j = int(np.where(ok[i], dist[i], np.iinfo(np.int64).max).argmin())
                how = f"pHash distance {int(dist[i, j])}"
                if self.max_thumb_diff is not None:
                    how += f", thumbnail difference {int(tdiff[i, j])}"
                out[i] = Match(*self.names[j], how)
        if self.min_similarity is not None and self.emb is not None and embed is not None:
            rest = [i for i, m in enumerate(out) if m is None]
            if rest:
                cos = _unit(embed([images[i] for i in rest])) @ self.emb.T
                for k, i in enumerate(rest):
                    j = int(cos[k].argmax())
                    if cos[k, j] >= self.min_similarity:
                        out[i] = Match(*self.names[j], f"embedding cosine {cos[k, j]:.4f}")
        return out


def clip_embedder(clip_paths: Any, device: str = "cpu") -> Embed:
    """``Embed`` from models.yaml ``clip_vision`` (the OpenCLIP image tower, loaded now); images are
    padded to a white square first, as the consistency stage does, so nothing is lost to the centre crop."""
    from dynaip.models.clip_vision import ClipImageEmbedder
    from pipeline.stages.consistency import square_on_white

    model = ClipImageEmbedder(clip_paths, device=device)

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        return model.embeddings([square_on_white(im) for im in images]).cpu().numpy()

    return embed
