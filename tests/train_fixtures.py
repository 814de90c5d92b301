"""Small datasets in the dataset layout of docs/ARCHITECTURE.md, written by the trainer tests themselves.

``write_dataset(dir, ...)`` writes ``dir/shards/NNNNNN.tar`` (WebDataset samples with
``ref.png``, ``tgt.jpg``, ``mask.png``, ``txt``, ``json``) and ``dir/manifest.json``
(written last), from the real photos bundled with scikit-image. Every sample gets a
distinct key ``test-{id}-{n}`` and a caption naming its index, so tests can tell samples apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


def _photo(i: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 crop of a bundled photo; the crop origin moves with ``i``."""
    import skimage.data

    img = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()  # (H, W, 3) uint8
    h, w = img.shape[:2]
    s = min(h, w) * 3 // 4
    y = (i * 37) % (h - s + 1)
    x = (i * 53) % (w - s + 1)
    return np.asarray(Image.fromarray(img[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC))


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=90) if fmt == "JPEG" else Image.fromarray(img).save(
        buf, format=fmt
    )
    return buf.getvalue()


def make_sample(
    i: int, pair: str = "intra", size: int = 96, quality: dict | None = None, ref_from: int | None = None
) -> dict[str, bytes]:
    """One sample's members: target photo, a reference = the centre subject on white, a mask;
    ``quality`` (curation scores, e.g. ``{"aesthetic": 5.1}``) goes into the json when given.

    ``ref_from``: cut the reference from sample ``ref_from``'s photo instead of this one's (a control
    whose reference tells nothing about its target; tests/test_reference_gap.py).
    """
    tgt = _photo(i, size)
    src = tgt if ref_from is None else _photo(ref_from, size)
    mask = np.zeros((size, size), np.uint8)
    q = size // 4
    mask[q : size - q, q : size - q] = 255
    ref = np.full((size - 2 * q, size - 2 * q + q // 2, 3), 255, np.uint8)  # not square: exercises padding
    ref[:, : size - 2 * q] = src[q : size - q, q : size - q]
    meta = {
        "source": "test",
        "source_id": str(i),
        "pair": pair,
        "phrase": "thing",
        "box": [q, q, size - q, size - q],
        "det_score": 0.9,
        "mask_area": float((mask > 0).mean()),
        "width": size,
        "height": size,
        "recipe": "test",
    }
    if quality is not None:
        meta["quality"] = quality
    return {
        "ref.png": _encode(ref, "PNG"),
        "tgt.jpg": _encode(tgt, "JPEG"),
        "mask.png": _encode(mask, "PNG"),
        "txt": f"a photo of sample {i}".encode(),
        "json": json.dumps(meta).encode(),
    }


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))


def write_dataset(
    out: str | Path,
    shard_sizes: Sequence[int],
    pair: str = "intra",
    start: int = 0,
    size: int = 96,
    corrupt: dict[int, str] | None = None,
    quality: Callable[[int], dict] | None = None,
    ref_index: Callable[[int], int] | None = None,
) -> Path:
    """Writes shards of the given sizes; returns ``out``.

    ``ref_index`` maps a sample index to the index whose photo its reference is cut from (default:
    its own, as curation's intra pairs are).

    ``corrupt`` maps a shard index to ``"truncate"`` (the tar is cut in its middle, so
    reading it raises ``tarfile.ReadError`` part-way) or ``"badimage"`` (the first sample's
    ``tgt.jpg`` is garbage). The manifest keeps the intended sample counts, as a manifest
    written before the damage would. ``quality(n)`` gives sample n's stored scores (none without it).
    """
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    entries, n = [], start
    for s, count in enumerate(shard_sizes):
        samples = []
        for _ in range(count):
            members = make_sample(
                n, pair, size, quality(n) if quality else None, None if ref_index is None else ref_index(n)
            )
            samples.append((f"test-{n:06d}-0", members))
            n += 1
        if corrupt.get(s) == "badimage":
            samples[0][1]["tgt.jpg"] = b"\xff\xd8 not a jpeg"
        path = out / "shards" / f"{s:06d}.tar"
        write_tar(path, samples)
        if corrupt.get(s) == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2 + 100])
        data = path.read_bytes()
        entries.append(
            {
                "path": f"shards/{s:06d}.tar",
                "samples": count,
                "pairs": {pair: count} if count else {},
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {
        "format": "dynaip-dataset/1",
        "recipe": {"name": "test", "pairing": pair},
        "shards": entries,
        "totals": {"inputs": n - start, "accepted": n - start, "rejected": 0, "rejected_by_reason": {}},
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return out


def local_train_config(root: Path, data: Path) -> Path:
    """jobs/configs/tiny.yaml as one 4-step intra stage on ``data`` with a checkpoint every 2 steps (no eval,
    no samples): the smallest run that has a checkpoint to resume from."""
    import yaml

    from dynaip.train.config import set_keys

    repo = Path(__file__).resolve().parents[1]
    cfg = set_keys(
        yaml.safe_load((repo / "jobs" / "configs" / "tiny.yaml").read_text()),
        stages=[{"name": "intra", "steps": 4, "pair": "intra", "data": [str(data)]}],
        lr=1e-2,
        checkpoint_every=2,
        eval_every=0,
        sample_every=0,
    )
    config = root / "local-train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def local_train(config: Path, models: Path, out: Path, *extra: str) -> int:
    """`dynaip train --local` in this process (its exit status)."""
    from dynaip.cli import main

    return main(["train", "--config", str(config), "--out", str(out), "--models", str(models), "--local", *extra])


def same_adapter(a: Path, b: Path) -> bool:
    """The two checkpoints' adapter weights are bit-identical."""
    import torch
    from safetensors.torch import load_file

    want, got = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


DREAMBENCH_DIRS = {"animal": "live_subject/animal", "human": "live_subject/human", "object": "object", "style": "style"}
"""Where the DreamBench++ release keeps each category under ``images/`` and ``captions/``."""


def write_dreambench(root: str | Path, per_category: dict[str, int], size: int = 48) -> Path:
    """A few subjects of DreamBench++ in the release's layout: ``images/live_subject/{animal,human}/NN.jpg``,
    ``images/{object,style}/NN.jpg`` and ``captions/`` mirroring it with ``NN.txt`` (line 0 the subject name,
    then 9 prompt lines); the images are bundled photos, so subjects differ.

    Follows yuangpeng/dreambench_plus: ``dreambench_plus/dreambench_plus_dataset.py`` (images and captions
    found under ``images/`` and ``captions/`` with mirrored relative paths, the category the parent
    directory, line 0 the subject, the other lines the prompts) and ``README.md`` (9 prompts per subject).
    """
    root = Path(root)
    n = 0
    for cat, count in per_category.items():
        for i in range(count):
            img = root / "images" / DREAMBENCH_DIRS[cat] / f"{i:02d}.jpg"
            cap = root / "captions" / DREAMBENCH_DIRS[cat] / f"{i:02d}.txt"
            img.parent.mkdir(parents=True, exist_ok=True)
            cap.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_photo(n, size)).save(img, quality=90)
            cap.write_text(f"{cat} {i}\n" + "".join(f"a photo of the {cat} {i}, scene {j}\n" for j in range(9)))
            n += 1
    return root


def write_eval_config(root: str | Path, judges: Sequence[dict] = ()) -> Path:
    """``root/eval.yaml`` in the keys of jobs/configs/eval_judges.yaml: protocol dreambench, ``judges``, and tiny
    random DINO weights (a timm ViT in the official DINO release's format, a flat state dict) at ``root/dino.pth``."""
    import timm
    import torch
    import yaml

    root = Path(root)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with torch.random.fork_rng():  # the caller's RNG stays as it was
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args)
    torch.save(model.state_dict(), root / "dino.pth")
    path = root / "eval.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "protocol": "dreambench",
                "judges": list(judges),
                "dino": {"path": "dino.pth", "arch": "vit_small_patch16_224", "model_args": args},
            }
        )
    )
    return path
