"""Builders of tiny source datasets in each source's real on-disk layout, from real photos in ``skimage.data``.

Not tests: importable helpers. Each ``build_*`` writes under ``root`` and returns a dict of the facts a
test checks against (ids, boxes, mask areas written). ``corrupt`` names the broken inputs to inject:

- SA-1B: ``json`` (one JSON unparsable), ``missing_image`` (a JSON without its jpg), ``bad_rle`` (one
  image's best annotation has truncated counts), ``all_bad`` (an image whose every annotation is broken).
- FFHQ: ``json`` (the metadata file unparsable), ``missing_image``, ``no_geometry``.
- VITON-HD: ``missing_cloth``, ``bad_line`` (a malformed pairs line).
- OpenS2V: ``bad_rle``, ``missing_video``, ``json`` (an unparsable part file), ``unknown_pair``.

Images are downscaled so everything builds in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
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
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def _jpg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- SA-1B


def _sa1b_image(name: str, w: int, h: int, image_id: int) -> tuple[np.ndarray, dict[str, Any], list[dict]]:
    """A photo and its SA-1B JSON with three masks: a dark-region threshold, an ellipse, a rectangle."""
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
        bbox = bbox_xywh(m)
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
        truth.append({"id": image_id * 100 + i, "bbox": bbox, "area": int(m.sum()), "rank": m.sum() * piou * stab})
    meta = {"image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}, "annotations": anns}
    return img, meta, truth


def build_sa1b(root: Path, *, layout: str = "folder", corrupt: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """SA-1B images ``sa_1``…``sa_4`` as an extracted folder (``layout="folder"``) or as two tars (``"tar"``).

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


def _wild_entry(path: str, blob: bytes, size: tuple[int, int], category: str, **geometry: Any) -> dict[str, Any]:
    return {
        "category": category,
        "metadata": {"photo_url": f"https://www.flickr.com/photos/x/{hashlib.md5(blob).hexdigest()[:8]}/",
                     "author": "someone", "license": "Attribution License", "country": "", "date_uploaded": "2010-01-01"},
        "image": {"file_url": "", "file_path": path.replace("in-the-wild-images", "images1024x1024"), "pixel_size": [1024, 1024]},
        "thumbnail": {"file_url": "", "file_path": path.replace("in-the-wild-images", "thumbnails128x128"), "pixel_size": [128, 128]},
        "in_the_wild": {"file_url": "", "file_path": path, "file_size": len(blob),
                        "file_md5": hashlib.md5(blob).hexdigest(), "pixel_size": list(size), **geometry},
    }


def _landmarks(box: list[float]) -> list[list[float]]:
    """68 points spread inside ``box`` (XYXY), touching all four sides."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    return [[round(float((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(a)), 3), round(float((y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(a)), 3)] for a in t]


def build_ffhq(root: Path, *, corrupt: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """FFHQ json + in-the-wild PNGs: astronaut (1 face), a two-face photo listed twice (entries 1, 2),
    a validation photo with landmarks only (3) and one with face_quad only (4).

    Returns ``{"records": {record id: {"face_box": XYXY, "ffhq_index": key, "from": key name}}, "rejects": {...}}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    records: dict[str, dict] = {}
    rejects: dict[str, str] = {}

    def save(idx: int, img: np.ndarray) -> tuple[str, bytes]:
        rel = f"in-the-wild-images/{idx // 1000 * 1000:05d}/{idx:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        (root / rel).write_bytes(buf.getvalue())
        return rel, buf.getvalue()

    astro = photo("astronaut", (128, 128))
    rel, blob = save(0, astro)
    meta["0"] = _wild_entry(rel, blob, (128, 128), "training", face_rect=[40, 10, 72, 50], face_quad=[[38, 8], [38, 52], [74, 52], [74, 8]])
    records["00000_face0"] = {"face_box": (40.0, 10.0, 72.0, 50.0), "ffhq_index": "0", "from": "face_rect"}

    # One photo, two faces: FFHQ lists it once per face; both entries' files are the same bytes.
    faces = skdata.lfw_subset()[:2]  # (2, 25, 25) float grey faces
    group = photo("coffee", (120, 80)).copy()
    for i, f in enumerate(faces):
        face = (np.stack([f] * 3, -1) * 255).astype(np.uint8)
        group[20:45, 10 + i * 60 : 35 + i * 60] = face
    for idx, x0 in ((1, 10), (2, 70)):
        rel, blob = save(idx, group)
        meta[str(idx)] = _wild_entry(rel, blob, (120, 80), "training", face_rect=[x0, 20, x0 + 25, 45])
    records["00001_face0"] = {"face_box": (10.0, 20.0, 35.0, 45.0), "ffhq_index": "1", "from": "face_rect"}
    records["00001_face1"] = {"face_box": (70.0, 20.0, 95.0, 45.0), "ffhq_index": "2", "from": "face_rect"}

    rel, blob = save(3, photo("astronaut", (100, 100)))
    meta["3"] = _wild_entry(rel, blob, (100, 100), "validation", face_landmarks=_landmarks([31.0, 8.0, 56.0, 39.0]))
    records["00003_face0"] = {"face_box": (31.0, 8.0, 56.0, 39.0), "ffhq_index": "3", "from": "face_landmarks"}

    rel, blob = save(4, photo("chelsea", (90, 60)))
    meta["4"] = _wild_entry(rel, blob, (90, 60), "training", face_quad=[[30, 5], [30, 35], [75, 35], [75, 5]])
    records["00004_face0"] = {"face_box": (30.0, 5.0, 75.0, 35.0), "ffhq_index": "4", "from": "face_quad"}

    if "missing_image" in corrupt:
        meta["5"] = _wild_entry("in-the-wild-images/00000/00005.png", b"gone", (64, 64), "training", face_rect=[1, 1, 20, 20])
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


def build_vitonhd(root: Path, *, split: str = "train", corrupt: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """VITON-HD ``root/<split>/{image,cloth,cloth-mask,image-parse-v3}`` + ``root/<split>_pairs.txt`` (unpaired).

    Persons ``00000_00``…``00002_00``: real photos (astronaut, coffee, chelsea) 96×72; the cloth is a crop of
    the photo pasted on white, the cloth-mask its silhouette. Returns ``{"ids": [...], "rejects": {...}}``.
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
        Image.fromarray(np.zeros((96, 72), np.uint8), mode="L").save(d / "image-parse-v3" / name.replace(".jpg", ".png"))
    # Unpaired list, as shipped: each person with someone else's garment.
    lines = [f"{names[i]} {names[(i + 1) % 3]}" for i in (2, 0, 1)]
    rejects: dict[str, str] = {}
    if "bad_line" in corrupt:
        lines.insert(1, "this line is not a pair at all")
        rejects[f"{split}_pairs-line2"] = "is not"
    if "missing_cloth" in corrupt:
        (d / "cloth" / names[1]).unlink()
        rejects["00001_00"] = "cloth/00001_00.jpg"
    (root / f"{split}_pairs.txt").write_text("\n".join(lines) + "\n")
    ids = [Path(n).stem for n in names if Path(n).stem not in rejects]
    return {"ids": ids, "rejects": rejects, "split_dir": d}


# --------------------------------------------------------------------------------------------- OpenS2V


def write_video(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """Encode RGB frames (all the same (H, W, 3), even sides) as H.264 in MP4 with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "g": "4"}  # keyframe every 4 frames, so seeking is exercised
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pan_frames(name: str, n: int = 8, h: int = 64, w: int = 96, step: int = 6) -> list[np.ndarray]:
    """A camera pan over a real photo: ``n`` (h, w, 3) frames, each shifted ``step`` px right."""
    img = photo(name, (w + step * n, h))
    return [np.ascontiguousarray(img[:, i * step : i * step + w]) for i in range(n)]


def _clip(path: str, crop: list[int], frame: int, objects: list[tuple[str, np.ndarray, float]], aesthetic: float) -> dict[str, Any]:
    """One OpenS2V clip entry; ``objects`` = (class_name, mask in the cropped frame, score), ids 1-based."""
    x0, x1, y0, y1 = crop
    h, w = y1 - y0, x1 - x0
    anns, mask_map, masks = [], {}, {}
    for i, (name, m, score) in enumerate(objects, start=1):
        bx, by, bw, bh = bbox_xywh(m)
        anns.append({"class_name": name, "bbox": [bx, by, bx + bw, by + bh], "gme_score": 0.7, "aes_score": 5.1})
        mask_map[str(i)] = {"class_name": name}
        masks[str(i)] = {**encode(m), "score": score}
    return {
        "metadata": {"path": path, "crop": crop, "fps": 8, "num_frames": 8, "resolution": {"height": 64, "width": 96},
                     "aesthetic": aesthetic, "tech": 2.0, "motion": 1.0, "face_cut": [0, 8],
                     "cap": f"A video of a {objects[0][0]} in a short pan."},
        "word_tags": [o[0] for o in objects],
        "annotation": {
            "ann_frame_data": {"ann_frame_idx": frame, "annotations": anns, "img_width": w, "img_height": h},
            "mask_map": mask_map,
            "mask_annotation": {str(frame): masks},
        },
    }


def build_opens2v(root: Path, *, corrupt: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """OpenS2V layout: ``Videos/total_part1/*.mp4`` (8-frame 96×64 pans over real photos),
    ``Jsons/total_part1.json`` (clips) and ``cross/<cluster>.json`` (pair records).

    Clips (part ``total_part1``), crop ``[8, 88, 4, 60]`` → cropped frame 56×80 (H×W), annotated frame 3:

    - ``cat_a``: 1 cat (kept), 2 near-copy of 1 with a lower score (dedup), 3 tiny (< 1/32, too small);
    - ``cat_b``: 1 cat (kept) — cross-paired with ``cat_a`` object 1;
    - ``cup``: 1 cup (kept); ``dull``: aesthetic 3.0 (rejected); ``crowd``: 7 separate masks (rejected).

    Returns ``{"intra": [record ids], "rejects": {id: reason word}, "cross": [record ids], "frames": {...}}``.
    """
    part, crop, frame = "total_part1", [8, 88, 4, 60], 3
    h, w = 56, 80
    vids = root / "Videos" / part
    frames = {"cat_a": pan_frames("chelsea"), "cat_b": pan_frames("chelsea", step=4), "cup": pan_frames("coffee"),
              "dull": pan_frames("rocket"), "crowd": pan_frames("astronaut")}
    for key, fr in frames.items():
        if not ("missing_video" in corrupt and key == "cup"):
            write_video(vids / f"{key}.mp4", fr)
    big = ellipse(h, w, 28, 40, 20, 25)
    near = big.copy()
    near[8, :] = 0  # IoU with `big` well above 0.8
    tiny = ellipse(h, w, 5, 5, 2, 2)
    crowd = []  # 7 separate 12x16 boxes, each 192 px = 4.3% of the frame (passes min_mask_frac)
    for i in range(7):
        top, left = 2 + (i // 4) * 14, 2 + (i % 4) * 19
        crowd.append(np.pad(np.ones((12, 16), np.uint8), ((top, h - 12 - top), (left, w - 16 - left))))
    clips = {
        "cat_a": _clip(f"cat_a.mp4", crop, frame, [("cat", big, 0.95), ("cat", near, 0.90), ("ear", tiny, 0.99)], 5.2),
        "cat_b": _clip("cat_b.mp4", crop, frame, [("cat", ellipse(h, w, 30, 36, 18, 22), 0.9)], 4.8),
        "cup": _clip("cup.mp4", crop, frame, [("cup", ellipse(h, w, 28, 40, 15, 15), 0.9)], 5.0),
        "dull": _clip("dull.mp4", crop, frame, [("rocket", big, 0.9)], 3.0),
        "crowd": _clip("crowd.mp4", crop, frame, [(f"person", m, 0.9) for m in crowd], 5.5),
    }
    intra = [f"{part}/cat_a/o1", f"{part}/cat_b/o1", f"{part}/cup/o1"]
    rejects = {f"{part}/cat_a/o2": "duplicate", f"{part}/cat_a/o3": "min_mask_frac",
               f"{part}/dull": "aesthetic", f"{part}/crowd": "max_masks"}
    if "bad_rle" in corrupt:
        m = clips["cat_b"]["annotation"]["mask_annotation"][str(frame)]["1"]
        m["counts"] = m["counts"][:-2]
        intra.remove(f"{part}/cat_b/o1")
        rejects[f"{part}/cat_b/o1"] = "RLE"
    if "missing_video" in corrupt:
        intra.remove(f"{part}/cup/o1")
        rejects[f"{part}/cup"] = "not found"
    (root / "Jsons").mkdir(parents=True, exist_ok=True)
    (root / "Jsons" / f"{part}.json").write_text(json.dumps(clips))
    if "json" in corrupt:
        (root / "Jsons" / "total_part2.json").write_text('{"clip": {"metadata": ')
        rejects["Jsons/total_part2.json"] = "cannot parse"

    pairs = [{"cur_id": f"{part}/cat_a", "aft_id": f"{part}/cat_b", "cur_class_id": "1", "aft_class_id": "1",
              "cur_class_name": "cat", "aft_class_name": "cat", "text_similarity": 1.0, "image_similarity": 0.93,
              "cur_frame_idx": frame, "aft_frame_idx": frame}]
    cross = [f"{part}/cat_a/o1/f3>{part}/cat_b/o1/f3", f"{part}/cat_b/o1/f3>{part}/cat_a/o1/f3"]
    if "bad_rle" in corrupt:
        cross = []
        rejects[f"{part}/cat_a/o1/f3>{part}/cat_b/o1/f3"] = "RLE"
        rejects[f"{part}/cat_b/o1/f3>{part}/cat_a/o1/f3"] = "RLE"
    if "unknown_pair" in corrupt:
        pairs.append({**pairs[0], "aft_id": f"{part}/no_such_clip"})
        rejects[f"{part}/cat_a/o1/f3>{part}/no_such_clip/oNone/f3"] = "not a readable clip"
        rejects[f"{part}/no_such_clip/oNone/f3>{part}/cat_a/o1/f3"] = "not a readable clip"
    (root / "cross").mkdir(parents=True, exist_ok=True)
    (root / "cross" / "cat_cluster.json").write_text(json.dumps(pairs + pairs[:1]))  # a verbatim repeat, as seen in the wild
    return {"intra": intra, "cross": cross, "rejects": rejects, "frames": frames, "crop": crop, "frame": frame,
            "frame_hw": (h, w), "areas": {"big": int(big.sum()), "cat_b": int(ellipse(h, w, 30, 36, 18, 22).sum())}}
