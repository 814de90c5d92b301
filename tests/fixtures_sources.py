"""Builders of tiny source datasets in each source's real on-disk layout, from real photos in ``skimage.data``.

Not tests: importable helpers. Each ``build_*`` writes under ``root`` and returns a dict of the facts a
test checks against (ids, boxes, mask areas written). ``corrupt`` names the broken inputs to inject:

- SA-1B: ``json`` (one JSON unparsable), ``missing_image`` (a JSON without its jpg), ``bad_rle`` (one
  image's best annotation has truncated counts), ``all_bad`` (an image whose every annotation is broken).
- FFHQ: ``json`` (the metadata file unparsable), ``missing_image``, ``no_geometry``.
- VITON-HD: ``missing_cloth``, ``bad_line`` (a malformed pairs line), ``repeat_line`` (a person listed twice).
- OpenS2V: ``bad_rle``, ``missing_video``, ``json`` (an unparsable part file), ``unknown_pair``,
  ``missing_piece`` (a piece of a split video tar).

Each builder's docstring names the upstream file or README whose layout it follows. Images are
downscaled so everything builds in about a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """``skimage.data.<name>()`` resized to ``size`` = (W, H), as (H, W, 3) uint8 RGB."""
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.asarray(Image.fromarray(img[..., :3]).resize(size, Image.BILINEAR))


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask → COCO RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """COCO-style ``[x, y, w, h]`` of a mask: ``w`` = number of columns (``x + w`` is one past the last)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def sam_bbox_xywh(mask: np.ndarray) -> list[int]:
    """SA-1B's ``bbox`` of a mask, as SAM's automatic mask generator writes it (segment-anything
    ``segment_anything/utils/amg.py``: ``batched_mask_to_box`` gives the first and last mask pixel, XYXY
    inclusive; ``box_xyxy_to_xywh`` subtracts): ``w`` = last column − first column."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def _jpg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- SA-1B


def _sa1b_image(name: str, w: int, h: int, image_id: int) -> tuple[np.ndarray, dict[str, Any], list[dict]]:
    """A photo and its SA-1B JSON with three masks: a dark-region threshold, an ellipse, a rectangle.

    The JSON follows the format in segment-anything's README ("Dataset": image_info + annotations with
    segmentation (COCO RLE), bbox [x, y, w, h], area, predicted_iou, stability_score, crop_box [x, y, w, h],
    point_coords); ``bbox`` is computed as SAM's automatic mask generator does (``sam_bbox_xywh``), and
    ``truth["box"]`` is the mask's exact XYXY bounds (exclusive right/bottom edge)."""
    img = photo(name, (w, h))
    gray = img.mean(axis=-1)
    masks = [
        (gray < np.percentile(gray, 30)).astype(np.uint8),  # real image structure
        ellipse(h, w, h * 0.5, w * 0.5, h * 0.3, w * 0.25),
        np.pad(np.ones((h // 4, w // 5), np.uint8), ((5, h - 5 - h // 4), (7, w - 7 - w // 5))),
    ]
    quality = [(0.90, 0.95), (0.99, 0.98), (0.80, 0.90)]  # (predicted_iou, stability_score)
    anns, truth = [], []
    for i, (m, (piou, stab)) in enumerate(zip(masks, quality)):
        bbox = sam_bbox_xywh(m)
        anns.append(
            {
                "id": image_id * 100 + i,
                "segmentation": encode(m),
                "bbox": bbox,
                "area": int(m.sum()),
                "predicted_iou": piou,
                "stability_score": stab,
                "crop_box": [0, 0, w, h],
                "point_coords": [[bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2]],
            }
        )
        ys, xs = np.nonzero(m)
        truth.append(
            {
                "id": image_id * 100 + i,
                "bbox": bbox,
                "area": int(m.sum()),
                "rank": m.sum() * piou * stab,
                "box": (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
            }
        )
    meta = {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }
    return img, meta, truth


def build_sa1b(
    root: Path, *, layout: str = "folder", corrupt: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """SA-1B images ``sa_1``…``sa_4`` as an extracted folder (``layout="folder"``) or as two tars (``"tar"``,
    ``sa_000000.tar``-style names each holding ``sa_N.jpg`` + ``sa_N.json``, as the SA-1B download ships them).

    Returns ``{"images": {stem: [annotation truth sorted by rank, best first]}, "rejects": {stem: reason word}}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    truth: dict[str, list[dict]] = {}
    rejects: dict[str, str] = {}
    for image_id, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"], start=1):
        img, meta, anns = _sa1b_image(name, 96, 72, image_id)
        stem = f"sa_{image_id}"
        truth[stem] = sorted(anns, key=lambda a: -a["rank"])
        if "bad_rle" in corrupt and image_id == 2:
            best = max(meta["annotations"], key=lambda a: a["area"] * a["predicted_iou"] * a["stability_score"])
            best["segmentation"]["counts"] = best["segmentation"]["counts"][:-3]
            truth[stem] = [a for a in truth[stem] if a["id"] != best["id"]]
        files[f"{stem}.jpg"] = _jpg(img)
        files[f"{stem}.json"] = json.dumps(meta).encode()
    if "all_bad" in corrupt:
        img, meta, _ = _sa1b_image("camera", 96, 72, 5)
        for a in meta["annotations"]:
            a["segmentation"] = {"size": [72, 96], "counts": "zz"}
        files["sa_5.jpg"], files["sa_5.json"] = _jpg(img), json.dumps(meta).encode()
        rejects["sa_5"] = "malformed"
    if "json" in corrupt:
        files["sa_3.json"] = b'{"image": {"width": 96, '  # truncated
        truth.pop("sa_3")
        rejects["sa_3"] = "parse"
    if "missing_image" in corrupt:
        del files["sa_4.jpg"]
        truth.pop("sa_4")
        rejects["sa_4"] = "missing"

    if layout == "folder":
        for name, blob in files.items():
            (root / name).write_bytes(blob)
    elif layout == "tar":
        stems = sorted({n.rsplit(".", 1)[0] for n in files})
        halves = (("sa_000000.tar", stems[:2]), ("sa_000001.tar", stems[2:]))
        for tar_name, part in halves:
            with tarfile.open(root / tar_name, "w") as tar:
                for stem in part:
                    for name in (f"{stem}.json", f"{stem}.jpg"):  # json before jpg: order must not matter
                        if name in files:
                            info = tarfile.TarInfo(name)
                            info.size, info.mtime = len(files[name]), 0
                            tar.addfile(info, io.BytesIO(files[name]))
    else:
        raise ValueError(f"layout={layout!r}: expected folder or tar")
    return {"images": truth, "rejects": rejects}


# ------------------------------------------------------------------------------------------------ FFHQ


def pixel_md5(blob: bytes) -> str:
    """FFHQ's ``pixel_md5``: MD5 of the decoded pixel array (NVlabs/ffhq-dataset ``download_ffhq.py`` checks
    ``hashlib.md5(np.array(image)).hexdigest()``); the same pixels give the same value however encoded."""
    try:
        return hashlib.md5(np.array(Image.open(io.BytesIO(blob)))).hexdigest()
    except OSError:
        return hashlib.md5(blob).hexdigest()


def _wild_entry(path: str, blob: bytes, size: tuple[int, int], category: str, **geometry: Any) -> dict[str, Any]:
    """One ``ffhq-dataset-v2.json`` entry with every key of NVlabs/ffhq-dataset's README ("Metadata").
    The aligned ``image`` / ``thumbnail`` files are not written (the reader uses ``in_the_wild`` only)."""
    md5 = hashlib.md5(blob).hexdigest()
    return {
        "category": category,
        "metadata": {
            "photo_url": f"https://www.flickr.com/photos/x/{md5[:8]}/",
            "photo_title": "DSCF0899.JPG",
            "author": "someone",
            "country": "",
            "license": "Attribution License",
            "license_url": "https://creativecommons.org/licenses/by/2.0/",
            "date_uploaded": "2010-01-01",
            "date_crawled": "2018-10-10",
        },
        "image": {
            "file_url": "",
            "file_path": path.replace("in-the-wild-images", "images1024x1024"),
            "file_size": 0,
            "file_md5": "",
            "pixel_size": [1024, 1024],
            "pixel_md5": "",
            "face_landmarks": [],
        },
        "thumbnail": {
            "file_url": "",
            "file_path": path.replace("in-the-wild-images", "thumbnails128x128"),
            "file_size": 0,
            "file_md5": "",
            "pixel_size": [128, 128],
            "pixel_md5": "",
        },
        "in_the_wild": {
            "file_url": "",
            "file_path": path,
            "file_size": len(blob),
            "file_md5": md5,
            "pixel_size": list(size),
            "pixel_md5": pixel_md5(blob),
            **geometry,
        },
    }


def _landmarks(box: list[float]) -> list[list[float]]:
    """68 points spread inside ``box`` (XYXY), touching all four sides."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    return [
        [
            round(float((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(a)), 3),
            round(float((y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(a)), 3),
        ]
        for a in t
    ]


def build_ffhq(root: Path, *, corrupt: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """FFHQ json + in-the-wild PNGs in the layout of NVlabs/ffhq-dataset's README (``ffhq-dataset-v2.json``,
    ``in-the-wild-images/00000/00000.png``): astronaut (1 face), a two-face photo listed twice (entries 1, 2)
    whose two copies are encoded differently (different ``file_md5``, same ``pixel_md5``, as the README
    warns the in-the-wild folder may hold several copies of one photo), and — deliberately short of the
    published entries, which carry all three — a validation photo with landmarks only (3) and one with
    face_quad only (4), to exercise the face-box fallbacks.

    Returns ``{"records": {record id: {"face_box": XYXY, "ffhq_index": key, "from": key name}}, "rejects": {...}}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    records: dict[str, dict] = {}
    rejects: dict[str, str] = {}

    def save(idx: int, img: np.ndarray, level: int = 6) -> tuple[str, bytes]:
        rel = f"in-the-wild-images/{idx // 1000 * 1000:05d}/{idx:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=level)
        (root / rel).write_bytes(buf.getvalue())
        return rel, buf.getvalue()

    astro = photo("astronaut", (128, 128))
    rel, blob = save(0, astro)
    meta["0"] = _wild_entry(
        rel, blob, (128, 128), "training", face_rect=[40, 10, 72, 50], face_quad=[[38, 8], [38, 52], [74, 52], [74, 8]]
    )
    records["00000_face0"] = {"face_box": (40.0, 10.0, 72.0, 50.0), "ffhq_index": "0", "from": "face_rect"}

    # One photo, two faces: FFHQ lists it once per face; the two copies are encoded differently.
    faces = skdata.lfw_subset()[:2]  # (2, 25, 25) float grey faces
    group = photo("coffee", (120, 80)).copy()
    for i, f in enumerate(faces):
        face = (np.stack([f] * 3, -1) * 255).astype(np.uint8)
        group[20:45, 10 + i * 60 : 35 + i * 60] = face
    for idx, x0, level in ((1, 10, 6), (2, 70, 1)):
        rel, blob = save(idx, group, level)
        meta[str(idx)] = _wild_entry(rel, blob, (120, 80), "training", face_rect=[x0, 20, x0 + 25, 45])
    assert meta["1"]["in_the_wild"]["file_md5"] != meta["2"]["in_the_wild"]["file_md5"]
    assert meta["1"]["in_the_wild"]["pixel_md5"] == meta["2"]["in_the_wild"]["pixel_md5"]
    records["00001_face0"] = {"face_box": (10.0, 20.0, 35.0, 45.0), "ffhq_index": "1", "from": "face_rect"}
    records["00001_face1"] = {"face_box": (70.0, 20.0, 95.0, 45.0), "ffhq_index": "2", "from": "face_rect"}

    rel, blob = save(3, photo("astronaut", (100, 100)))
    meta["3"] = _wild_entry(rel, blob, (100, 100), "validation", face_landmarks=_landmarks([31.0, 8.0, 56.0, 39.0]))
    records["00003_face0"] = {"face_box": (31.0, 8.0, 56.0, 39.0), "ffhq_index": "3", "from": "face_landmarks"}

    rel, blob = save(4, photo("chelsea", (90, 60)))
    meta["4"] = _wild_entry(rel, blob, (90, 60), "training", face_quad=[[30, 5], [30, 35], [75, 35], [75, 5]])
    records["00004_face0"] = {"face_box": (30.0, 5.0, 75.0, 35.0), "ffhq_index": "4", "from": "face_quad"}

    if "missing_image" in corrupt:
        meta["5"] = _wild_entry(
            "in-the-wild-images/00000/00005.png", b"gone", (64, 64), "training", face_rect=[1, 1, 20, 20]
        )
        rejects["00005_face0"] = "not found"
    if "no_geometry" in corrupt:
        rel, blob = save(6, photo("rocket", (64, 48)))
        meta["6"] = _wild_entry(rel, blob, (64, 48), "training")
        rejects["00006_face0"] = "no usable face geometry"
    text = json.dumps(meta, indent=1)
    if "json" in corrupt:
        text = text[: len(text) // 2]
    (root / "ffhq-dataset-v2.json").write_text(text)
    return {"records": records, "rejects": rejects}


# -------------------------------------------------------------------------------------------- VITON-HD


def build_vitonhd(
    root: Path, *, split: str = "train", corrupt: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """VITON-HD ``root/<split>/{image,cloth,cloth-mask,image-parse-v3}`` + ``root/<split>_pairs.txt`` (unpaired),
    as in shadow2496/VITON-HD (README "Dataset"/"Testing" and ``datasets.py``: ``<dataset_dir>/<mode>/image``,
    ``cloth``, ``cloth-mask`` with the person's file name, pairs list ``<dataset_dir>/<mode>_pairs.txt``); a
    root built with only ``split="test"`` is the test-only download's ``datasets/`` folder.

    Persons ``00000_00``…``00002_00``: real photos (astronaut, coffee, chelsea) 96×72; the cloth is a crop of
    the photo pasted on white, the cloth-mask its silhouette. ``corrupt``: ``bad_line``, ``missing_cloth``,
    ``repeat_line`` (a person listed twice). Returns ``{"ids": [...], "rejects": {...}, "split_dir"}``.
    """
    d = root / split
    for sub in ("image", "cloth", "cloth-mask", "image-parse-v3"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}_00.jpg" for i in range(3)]
    for name, src in zip(names, ("astronaut", "coffee", "chelsea")):
        person = photo(src, (72, 96))  # VITON-HD is portrait, H > W
        Image.fromarray(person).save(d / "image" / name, quality=90)
        silhouette = ellipse(96, 72, 48, 36, 30, 22).astype(bool)
        cloth = np.full_like(person, 255)
        cloth[silhouette] = person[silhouette]
        Image.fromarray(cloth).save(d / "cloth" / name, quality=90)
        Image.fromarray(silhouette.astype(np.uint8) * 255).save(d / "cloth-mask" / name, quality=90)
        Image.fromarray(np.zeros((96, 72), np.uint8), mode="L").save(
            d / "image-parse-v3" / name.replace(".jpg", ".png")
        )
    # Unpaired list, as shipped: each person with someone else's garment.
    lines = [f"{names[i]} {names[(i + 1) % 3]}" for i in (2, 0, 1)]
    rejects: dict[str, str] = {}
    if "bad_line" in corrupt:
        lines.insert(1, "this line is not a pair at all")
        rejects[f"{split}_pairs-line2"] = "is not"
    if "repeat_line" in corrupt:
        lines.append(f"{names[2]} {names[1]}")
        rejects[f"{split}_pairs-line{len(lines)}"] = "repeats person"
    if "missing_cloth" in corrupt:
        (d / "cloth" / names[1]).unlink()
        rejects["00001_00"] = "cloth/00001_00.jpg"
    (root / f"{split}_pairs.txt").write_text("\n".join(lines) + "\n")
    ids = [Path(n).stem for n in names if Path(n).stem not in rejects]
    return {"ids": ids, "rejects": rejects, "split_dir": d}


# --------------------------------------------------------------------------------------------- OpenS2V

LEGACY_HANDLER = "Обработчик видео Apple".encode("cp1251")
"""The ``hdlr`` name of OpenS2V's demo clip ``gm1252760410-365677148_part2.mp4`` (PKU-YuanGroup/OpenS2V-Nexus,
``data_process/demo_result/step0/videos/dataset1/``): "Apple video handler" in the Windows-1251 code page,
which is not UTF-8 — a strict ``av.open`` raises ``UnicodeDecodeError`` on that clip."""


def write_video(path: Path, frames: list[np.ndarray], fps: int = 8, handler_name: bytes | None = None) -> None:
    """Encode RGB frames (all the same (H, W, 3), even sides) as H.264 in MP4 with PyAV.

    ``handler_name``: raw bytes for the video track's ``hdlr`` name (e.g. ``LEGACY_HANDLER``). The muxer is
    given an ASCII placeholder of the same length, which is then overwritten byte for byte, so the box
    sizes stay valid and the file carries exactly those (non-UTF-8) bytes, as the upstream demo clip does.
    """
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder = b"H" * len(handler_name) if handler_name else None
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "g": "4"}  # keyframe every 4 frames, so seeking is exercised
        if placeholder:
            stream.metadata["handler_name"] = placeholder.decode()
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if handler_name:
        data = path.read_bytes()
        assert data.count(placeholder) == 1, "handler name placeholder not found exactly once"
        path.write_bytes(data.replace(placeholder, handler_name))


def pan_frames(name: str, n: int = 8, h: int = 64, w: int = 96, step: int = 6) -> list[np.ndarray]:
    """A camera pan over a real photo: ``n`` (h, w, 3) frames, each shifted ``step`` px right."""
    img = photo(name, (w + step * n, h))
    return [np.ascontiguousarray(img[:, i * step : i * step + w]) for i in range(n)]


def clip_key(vid: str, seg: int) -> str:
    """A clip key shaped like OpenS2V-5M's (``<video id>_segment_<n>_step1-…_step5``); the cluster is the
    part before ``_segment`` (upstream ``data_process/step6-1_get_cluster.py``)."""
    return f"{vid}_segment_{seg}_step1-0-8_step2-0-8_step3_step4_step5"


def _clip(
    path: str,
    crop: list[int],
    frame: int,
    objects: list[tuple],
    aesthetic: float,
    *,
    background: list[str],
    cap_qwen: str | None,
) -> dict[str, Any]:
    """One clip entry as in upstream's ``data_process/demo_result/step5/merge_final_json/dataset1.json``.

    ``objects`` = (class_name, mask in the cropped frame, SAM score, aes_score); object ids are 1-based,
    mask scores are one-element lists (SAM 2's ``scores.tolist()`` with ``multimask_output=False``)."""
    x0, x1, y0, y1 = crop
    h, w = y1 - y0, x1 - x0
    anns, mask_map, masks = [], {}, {}
    for i, (name, m, score, aes) in enumerate(objects, start=1):
        bx, by, bw, bh = bbox_xywh(m)
        anns.append(
            {
                "class_name": name,
                "bbox": [float(bx), float(by), float(bx + bw), float(by + bh)],
                "gme_score": 0.31,
                "aes_score": aes,
            }
        )
        mask_map[str(i)] = {"class_name": name}
        masks[str(i)] = {**encode(m), "score": [score]}
    names = [o[0] for o in objects]
    meta = {
        "cut": [0, 8],
        "crop": crop,
        "tech": 2.0,
        "motion": 0.01,
        "fps": 8.0,
        "num_frames": 8,
        "resolution": {"height": 64, "width": 96},
        "path": path,
        "aesthetic": aesthetic,
        "face_cut": [0, 8],
        "cap": [f"Legacy caption: a {names[0]} in a short pan."],
    }
    if cap_qwen is not None:
        meta["face_cap_qwen"] = cap_qwen
    return {
        "metadata": meta,
        "word_tags": {
            "background": background,
            "subject": [n for n in names if n not in background],
            "object": [],
            "pre_define": ["person", "human head"],
        },
        "annotation": {
            "ann_frame_data": {
                "ann_frame_idx": frame,
                "annotations": anns,
                "box_format": "xyxy",
                "img_width": w,
                "img_height": h,
                "foreground_ase_score": 4.9,
                "background_ase_score": 4.6,
            },
            "mask_map": mask_map,
            "mask_annotation": {str(frame): masks},
        },
    }


def _tar_pieces(members: dict[str, bytes], folder: Path, stem: str, piece: int) -> list[Path]:
    """A tar of ``members`` written as ``<stem>.tar.split.000, .001, …`` pieces of ``piece`` bytes each
    (what ``split -b`` makes; ``cat <stem>.tar.split.* > <stem>.tar`` restores it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(blob), 0
            tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(0, len(data), piece):
        p = folder / f"{stem}.tar.split.{i // piece:03d}"
        p.write_bytes(data[i : i + piece])
        out.append(p)
    return out


def build_opens2v(
    root: Path, *, corrupt: frozenset[str] | set[str] = frozenset(), pairs: str = "current", subsets: bool = False
) -> dict[str, Any]:
    """OpenS2V-5M in its published layout, tiny. Followed upstream material (PKU-YuanGroup/OpenS2V-Nexus):

    - layout: maintainers' answer in issue #16 (``Jsons/mask_and_bbox/total_partX.json``, ``Videos/total_partX``),
      README news of 2025-06-19 (``Jsons/cross_video_pairs``), ``data_process/demo_dataloader.py`` (pair ids
      ``<part>/<clip key>``, ``<cluster>.json`` files beside ``cluster_videos.json``), issue #7 (``metadata.path``
      like ``part_5184/<video id>/<video id>_segment_2.mp4``); videos as published: a tar in
      ``*.tar.split.NNN`` pieces per part;
    - clip JSON: ``data_process/demo_result/step5/merge_final_json/dataset1.json`` and the writer
      ``data_process/step5-2_get_subject_image.py`` (``score: [float]``, ``aes_score``/``gme_score`` per
      annotation, ``word_tags.background``, ``face_cap_qwen`` and the older ``cap`` list);
    - pairs (``pairs="current"``): ``data_process/demo_result/step6/cross-frames-pairs/final_output/
      gm1252760410-365677148.json`` and ``cluster_videos.json`` (written by ``step6-2_get_cross-frame.py``);
      ``pairs="legacy"``: the older ``data_process/demo_result/step6/cross-frames-images/gm1252760410-365677148.json``
      (no class ids, bare clip keys) with ``step6/cluster_videos.json``, and the older flat ``Jsons/total_partN.json``.

    Tree (``pairs="current"``)::

        Jsons/mask_and_bbox/total_part1.json   clips of part 1   Videos/total_part1/part_0001/<vid>/<vid>_segment_N.mp4 (extracted)
        Jsons/mask_and_bbox/total_part2.json   clips of part 2   Videos/total_part2/total_part2.tar.split.000 … (as published)
        Jsons/cross_video_pairs/cluster_videos.json, catvid.json, dogvid.json

    Every clip: 8-frame 96×64 pan over a real photo, crop ``[8, 88, 4, 60]`` → cropped frame 56×80 (H×W),
    annotated frame 3. Part 1: ``catvid`` seg 0 (o1 a smaller near-copy of o2 with the higher score → the
    duplicate; o2 kept; o3 tiny; o4 "grass", a background tag), seg 2 (one cat); ``cupvid`` seg 0 (o1 kept, o2
    aes_score 3.2); ``crowdvid`` seg 0 (8 people; the two lowest aes_scores fall outside the top 6); ``dullvid``
    seg 0 (clip aesthetic 3.0, subject aes 5.0: kept; no ``face_cap_qwen``, so its caption is ``cap``);
    ``oddvid`` seg 0 (its container's handler name is not UTF-8). Part 2 (in the split tar): ``catvid`` seg 1,
    ``dogvid`` seg 0 (two dogs) and seg 1 (one dog, non-UTF-8 handler name too).

    ``subsets=True``: the ``Jsons/`` folder as the Hugging Face file tree of BestWishYsh/OpenS2V-5M lists it
    (docs/sources.md, "Layout as published"): two annotation subsets, ``mask_and_bbox/`` (every clip; part 2
    published zipped, ``total_part2.json.zip``) and ``mask_and_bbox_High-Quality/`` (``total_part1.json``
    holding a copy of catvid seg 0 and cupvid seg 0), beside the per-part metadata files
    ``Jsons/total_partN.json`` (captions and scores, no annotation: not subjects) and ``gpt_video_pairs/``.
    Read with every subset, the two copies are rejects ("also in subset mask_and_bbox"); ``truth["hq"]`` are
    the intra ids of the High-Quality subset alone.

    ``corrupt``: ``bad_rle`` (catvid seg 1's mask truncated), ``missing_video`` (cupvid's mp4 gone), ``json``
    (``total_part3.json`` truncated), ``unknown_pair`` (a pair naming a clip that does not exist),
    ``missing_piece`` (the second tar piece of part 2 gone).

    Returns ``{"intra": [ids], "cross": [ids], "rejects": {id: reason word}, "frames": {clip id: frames},
    "ids": {name: clip id}, "crop", "frame", "frame_hw", "areas", "pair_records": n, "sides": 2}``.
    """
    crop, frame, (h, w) = [8, 88, 4, 60], 3, (56, 80)
    legacy = pairs == "legacy"
    big = ellipse(h, w, 28, 40, 20, 25)
    near = big.copy()
    near[8:10, :] = 0  # a smaller near-copy: IoU with `big` well above 0.8
    tiny = ellipse(h, w, 5, 5, 2, 2)
    grass = np.zeros((h, w), np.uint8)
    grass[44:, :] = 1
    crowd = []  # 8 separate 12x16 boxes (192 px = 4.3% of the frame each)
    for i in range(8):
        top, left = 2 + (i // 4) * 14, 2 + (i % 4) * 19
        crowd.append(np.pad(np.ones((12, 16), np.uint8), ((top, h - 12 - top), (left, w - 16 - left))))
    crowd_aes = [5.0, 5.7, 4.9, 5.9, 6.1, 4.6, 5.5, 5.2]
    cat_b, cat_c = ellipse(h, w, 30, 36, 18, 22), ellipse(h, w, 26, 44, 17, 21)
    dog1, dog2, dog3 = ellipse(h, w, 28, 20, 14, 12), ellipse(h, w, 28, 60, 14, 12), ellipse(h, w, 28, 40, 16, 20)
    bg = ["grass", "park"]
    # (part, video id, segment, photo, objects, clip aesthetic, face_cap_qwen, handler name)
    spec = [
        (
            1,
            "catvid",
            0,
            "chelsea",
            [("cat", near, 0.99, 5.2), ("cat", big, 0.90, 5.3), ("ear", tiny, 0.99, 5.0), ("grass", grass, 0.95, 5.0)],
            5.2,
            "A cat looks around in a garden.",
            None,
        ),
        (1, "catvid", 2, "chelsea", [("cat", cat_b, 0.9, 4.8)], 4.8, "The same cat, later.", None),
        (
            1,
            "cupvid",
            0,
            "coffee",
            [("cup", ellipse(h, w, 28, 40, 15, 15), 0.9, 5.0), ("saucer", ellipse(h, w, 40, 40, 8, 20), 0.9, 3.2)],
            5.0,
            "A cup of coffee.",
            None,
        ),
        (
            1,
            "crowdvid",
            0,
            "astronaut",
            [("person", m, 0.9, a) for m, a in zip(crowd, crowd_aes)],
            5.5,
            "People.",
            None,
        ),
        (1, "dullvid", 0, "rocket", [("rocket", big, 0.9, 5.0)], 3.0, None, None),
        (1, "oddvid", 0, "coffee", [("mug", big, 0.9, 5.1)], 5.1, "A mug, filmed on an old phone.", LEGACY_HANDLER),
        (2, "catvid", 1, "chelsea", [("cat", cat_c, 0.93, 5.1)], 5.1, "The cat again.", None),
        (2, "dogvid", 0, "astronaut", [("dog", dog1, 0.9, 5.0), ("dog", dog2, 0.9, 5.0)], 5.0, "Two dogs.", None),
        (2, "dogvid", 1, "astronaut", [("dog", dog3, 0.9, 5.0)], 5.0, "A dog.", LEGACY_HANDLER),
    ]
    parts: dict[int, dict[str, Any]] = {1: {}, 2: {}}
    frames: dict[str, list[np.ndarray]] = {}
    ids: dict[str, str] = {}
    tar_members: dict[str, bytes] = {}
    for part, vid, seg, src, objects, aesthetic, cap_qwen, handler in spec:
        key, rel = clip_key(vid, seg), f"part_000{part}/{vid}/{vid}_segment_{seg}.mp4"
        cid = f"total_part{part}/{key}"
        ids[f"{vid}{seg}"] = cid
        fr = pan_frames(src, step=4 + seg)
        frames[cid] = fr
        video = root / "Videos" / f"total_part{part}" / rel
        write_video(video, fr, handler_name=handler)
        if part == 2:  # published as tar pieces, not extracted
            tar_members[rel] = video.read_bytes()
            video.unlink()
        parts[part][key] = _clip(rel, crop, frame, objects, aesthetic, background=bg, cap_qwen=cap_qwen)
    shutil.rmtree(root / "Videos" / "total_part2")
    pieces = _tar_pieces(tar_members, root / "Videos" / "total_part2", "total_part2", piece=8_000)
    assert len(pieces) >= 3, "the tar must span several pieces"

    I = ids
    intra = [f"{I['catvid0']}/o2", f"{I['catvid2']}/o1", f"{I['cupvid0']}/o1"]
    intra += [f"{I['crowdvid0']}/o{o}" for o in (1, 2, 4, 5, 7, 8)]
    intra += [
        f"{I['dullvid0']}/o1",
        f"{I['oddvid0']}/o1",
        f"{I['catvid1']}/o1",
        f"{I['dogvid0']}/o1",
        f"{I['dogvid0']}/o2",
        f"{I['dogvid1']}/o1",
    ]
    rejects = {
        f"{I['catvid0']}/o1": "duplicate",
        f"{I['catvid0']}/o3": "min_mask_frac",
        f"{I['catvid0']}/o4": "background",
        f"{I['cupvid0']}/o2": "min_subject_aesthetic",
        f"{I['crowdvid0']}/o3": "top max_masks=6",
        f"{I['crowdvid0']}/o6": "top max_masks=6",
    }
    if "bad_rle" in corrupt:
        m = parts[2][clip_key("catvid", 1)]["annotation"]["mask_annotation"][str(frame)]["1"]
        m["counts"] = m["counts"][:-2]
        intra.remove(f"{I['catvid1']}/o1")
        rejects[f"{I['catvid1']}/o1"] = "RLE"
    if "missing_video" in corrupt:
        (root / "Videos" / "total_part1" / "part_0001" / "cupvid" / "cupvid_segment_0.mp4").unlink()
        intra.remove(f"{I['cupvid0']}/o1")
        del rejects[f"{I['cupvid0']}/o2"]
        rejects[I["cupvid0"]] = "not under"
    if "missing_piece" in corrupt:
        pieces[1].unlink()
        for name in ("catvid1", "dogvid0", "dogvid1"):
            for o in (1, 2):
                if f"{I[name]}/o{o}" in intra:
                    intra.remove(f"{I[name]}/o{o}")
            rejects.pop(f"{I[name]}/o1", None)
            rejects[I[name]] = "unreadable"
    clip_dir = root / "Jsons" if legacy else root / "Jsons" / "mask_and_bbox"
    clip_dir.mkdir(parents=True, exist_ok=True)
    for part, clips in parts.items():
        (clip_dir / f"total_part{part}.json").write_text(json.dumps(clips, indent=1))
    hq: list[str] = []
    if subsets:
        import zipfile

        part2 = clip_dir / "total_part2.json"
        with zipfile.ZipFile(clip_dir / "total_part2.json.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.write(part2, "total_part2.json")
        part2.unlink()
        hq_keys = [clip_key("catvid", 0), clip_key("cupvid", 0)]
        hq_dir = root / "Jsons" / "mask_and_bbox_High-Quality"
        hq_dir.mkdir(parents=True)
        (hq_dir / "total_part1.json").write_text(json.dumps({k: parts[1][k] for k in hq_keys}, indent=1))
        for k in hq_keys:
            rejects[f"total_part1/{k}@mask_and_bbox_High-Quality"] = "also in subset mask_and_bbox"
        hq = [r for r in intra if r.split("/")[1] in hq_keys]
        for part, clips in parts.items():  # metadata only, as Jsons/total_partN.json is published
            meta = {k: {"metadata": c["metadata"]} for k, c in clips.items()}
            (root / "Jsons" / f"total_part{part}.json").write_text(json.dumps(meta))
        (root / "Jsons" / "gpt_video_pairs").mkdir()  # a folder of the release that holds no annotation
    if "json" in corrupt:
        (clip_dir / "total_part3.json").write_text('{"clip": {"metadata": ')
        rejects[(clip_dir / "total_part3.json").relative_to(root).as_posix()] = "cannot parse"

    def pair(cur: str, aft: str, cid: Any, aid: Any, cname: str, aname: str, sim: float) -> dict[str, Any]:
        rec = {
            "cur_id": cur,
            "aft_id": aft,
            "cur_class_id": cid,
            "aft_class_id": aid,
            "cur_class_name": cname,
            "aft_class_name": aname,
            "text_similarity": 1.0,
            "image_similarity": sim,
            "cur_frame_idx": frame,
            "aft_frame_idx": frame,
        }
        if legacy:  # older format: bare clip keys, no class ids
            rec = {k: v for k, v in rec.items() if k not in ("cur_class_id", "aft_class_id")}
            rec["cur_id"], rec["aft_id"] = cur.split("/", 1)[1], aft.split("/", 1)[1]
        return rec

    def rid(t: str, to: int, r: str, ro: int) -> str:
        return f"{t}/o{to}/f{frame}>{r}/o{ro}/f{frame}"

    cross: list[str] = []
    if not legacy:
        pair_dir, f_cat, f_dog = root / "Jsons" / "cross_video_pairs", "catvid", "dogvid"
        cat_pairs = [
            pair(I["catvid0"], I["catvid1"], "2", "1", "cat", "cat", 0.93),  # 0: valid
            pair(I["catvid0"], I["catvid2"], "4", "1", "cat", "cat", 0.71),  # 1: o4 is "grass": class id mismatch
            pair(I["catvid2"], I["catvid1"], "1", "1", "cat", "cat", 0.90),  # 2: valid
            pair(I["catvid0"], I["catvid1"], "2", "1", "cat", "cat", 0.93),  # 3: verbatim repeat of 0
            pair(I["catvid0"], I["catvid2"], "9", "1", "cat", "cat", 0.80),  # 4: no object 9
        ]
        dog_pairs = [pair(I["dogvid0"], I["dogvid1"], "2", "1", "dog", "dog", 0.88)]
        rel_cat = f"Jsons/cross_video_pairs/{f_cat}.json"
        cross = [
            rid(I["catvid0"], 2, I["catvid1"], 1),
            rid(I["catvid1"], 1, I["catvid0"], 2),
            rid(I["catvid2"], 1, I["catvid1"], 1),
            rid(I["catvid1"], 1, I["catvid2"], 1),
            rid(I["dogvid0"], 2, I["dogvid1"], 1),
            rid(I["dogvid1"], 1, I["dogvid0"], 2),
        ]
        rejects[f"{I['catvid0']}>{I['catvid2']}@{rel_cat}#1"] = "class id mismatch"
        rejects[f"{I['catvid2']}>{I['catvid0']}@{rel_cat}#1"] = "class id mismatch"
        rejects[f"{rid(I['catvid0'], 2, I['catvid1'], 1)}~{rel_cat}#3"] = "repeats"
        rejects[f"{rid(I['catvid1'], 1, I['catvid0'], 2)}~{rel_cat}#3"] = "repeats"
        rejects[f"{I['catvid0']}>{I['catvid2']}@{rel_cat}#4"] = "not an object"
        rejects[f"{I['catvid2']}>{I['catvid0']}@{rel_cat}#4"] = "not an object"
        cluster_index = {"catvid": [I["catvid0"], I["catvid1"], I["catvid2"]], "dogvid": [I["dogvid0"], I["dogvid1"]]}
        index_path = pair_dir / "cluster_videos.json"
    else:
        pair_dir, f_cat, f_dog = root / "step6" / "cross-frames-images", "catvid", "dogvid"
        # Upstream order: for each cur object, for each aft object. cat o1 and o2 both pair with catvid1 o1
        # under the same class names and, as in the upstream demo, the same similarities: records repeated
        # verbatim that are distinct object pairs.
        cat_pairs = [
            pair(I["catvid0"], I["catvid1"], None, None, "cat", "cat", 0.93),
            pair(I["catvid0"], I["catvid1"], None, None, "cat", "cat", 0.93),
            pair(I["catvid2"], I["catvid1"], None, None, "cat", "cat", 0.90),
        ]
        dog_pairs = [pair(I["dogvid0"], I["dogvid1"], None, None, "dog", "dog", 0.88)]  # dog o1 or o2: ambiguous
        rel_dog = f"step6/cross-frames-images/{f_dog}.json"
        cross = [
            rid(I["catvid0"], 1, I["catvid1"], 1),
            rid(I["catvid1"], 1, I["catvid0"], 1),
            rid(I["catvid0"], 2, I["catvid1"], 1),
            rid(I["catvid1"], 1, I["catvid0"], 2),
            rid(I["catvid2"], 1, I["catvid1"], 1),
            rid(I["catvid1"], 1, I["catvid2"], 1),
        ]
        k0, k1 = clip_key("dogvid", 0), clip_key("dogvid", 1)
        rejects[f"{k0}>{k1}@{rel_dog}#0"] = "ambiguous"
        rejects[f"{k1}>{k0}@{rel_dog}#0"] = "ambiguous"
        cluster_index = {"catvid": [clip_key("catvid", s) for s in (0, 1, 2)], "dogvid": [k0, k1]}
        index_path = root / "step6" / "cluster_videos.json"
    if "unknown_pair" in corrupt:
        cat_pairs.append({**cat_pairs[0], "aft_id": "total_part1/no_such_clip" if not legacy else "no_such_clip"})
        rel_cat = (pair_dir / f"{f_cat}.json").relative_to(root).as_posix()
        n, cur, aft = len(cat_pairs) - 1, cat_pairs[-1]["cur_id"], cat_pairs[-1]["aft_id"]
        rejects[f"{cur}>{aft}@{rel_cat}#{n}"] = "not a readable clip"
        rejects[f"{aft}>{cur}@{rel_cat}#{n}"] = "not a readable clip"
    if "missing_piece" in corrupt:  # part 2's clips are unreadable: every pair naming one is a reject
        if legacy:
            raise ValueError("missing_piece is built for the current pair format only")
        cross = [r for r in cross if not any(I[n] in r for n in ("catvid1", "dogvid0", "dogvid1"))]
        rejects = {k: v for k, v in rejects.items() if "~" not in k}  # nothing left for record 3 to repeat
        for name, recs in ((f_cat, cat_pairs), (f_dog, dog_pairs)):
            rel = f"Jsons/cross_video_pairs/{name}.json"
            for n, rec in enumerate(recs):
                if any(I[v] in (rec["cur_id"], rec["aft_id"]) for v in ("catvid1", "dogvid0", "dogvid1")):
                    rejects[f"{rec['cur_id']}>{rec['aft_id']}@{rel}#{n}"] = "not a readable clip"
                    rejects[f"{rec['aft_id']}>{rec['cur_id']}@{rel}#{n}"] = "not a readable clip"
    elif "bad_rle" in corrupt:  # every pair using catvid1's mask (the verbatim repeat still reports a repeat)
        for r in list(cross):
            if I["catvid1"] in r:
                cross.remove(r)
                rejects[r] = "RLE"
    pair_dir.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(cluster_index, indent=4))
    (pair_dir / f"{f_cat}.json").write_text(json.dumps(cat_pairs, indent=2))
    (pair_dir / f"{f_dog}.json").write_text(json.dumps(dog_pairs, indent=2))
    return {
        "intra": intra,
        "cross": cross,
        "rejects": rejects,
        "frames": frames,
        "ids": ids,
        "crop": crop,
        "hq": hq,
        "frame": frame,
        "frame_hw": (h, w),
        "pieces": pieces,
        "pair_records": len(cat_pairs) + len(dog_pairs),
        "areas": {"big": int(big.sum()), "near": int(near.sum()), "cat_c": int(cat_c.sum())},
    }
