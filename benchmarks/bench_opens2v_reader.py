"""Peak memory of the OpenS2V reader on a generated multi-GB annotation file.

    python benchmarks/bench_opens2v_reader.py --gb 2.5 [--dir /tmp] [--json OUT] [--whole-file-mb 150]

Writes, in a fresh temp folder, an OpenS2V-5M tree in its published layout (docs/sources.md):
``Jsons/mask_and_bbox/total_part1.json`` of about ``--gb`` GB (clips of 14 subjects with 720p COCO-RLE
masks, ``score: [float]``, ``aes_score``, captions, word tags), one small video shared by every clip,
and ``Jsons/cross_video_pairs/<cluster>.json`` pair files naming every ``--pair-every``-th clip. Then it
reads it with ``pipeline.sources.opens2v`` (intra and cross records) in a child process and reports the
child's peak RSS next to its RSS after imports, so the growth is what reading added. The peak is the
child's ``VmHWM`` from ``/proc/self/status``, reset after imports (``/proc/self/clear_refs``); the child's
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported too, but Linux starts it at the parent's peak. ``--whole-file-mb`` also measures, on a smaller file, what parsing the file
whole (``json.load``, what the reader did before) costs, to show the scale that streaming avoids. The
files are deleted afterwards; the result is printed as JSON (and written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
H, W = 720, 1280  # cropped frame of a 720p clip (crop = the whole frame)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def _mask_pool(n: int, seed: int) -> list[tuple[dict, list[float]]]:
    """``n`` ellipse masks of a 720p frame (as RLE) with their XYXY boxes; 5–60 % of the frame each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    pool = []
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75) * H, rng.uniform(0.25, 0.75) * W
        ry, rx = rng.uniform(0.15, 0.45) * H, rng.uniform(0.15, 0.45) * W
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ys, xs = np.nonzero(m)
        pool.append((_rle(m), [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]))
    return pool


NAMES = [
    "person",
    "woman",
    "dog",
    "cup",
    "bag",
    "hat",
    "car",
    "tree",
    "grass",
    "park",
    "table",
    "phone",
    "guitar",
    "bicycle",
]


def _name(i: int, j: int) -> str:
    """Class of object ``j`` (1-based) of clip ``i``."""
    return NAMES[(i + j) % len(NAMES)]


def _clip_text(i: int, pool: list[tuple[str, list[float]]], rng: np.random.Generator, objects: int, head: str) -> str:
    """The JSON text of clip ``i`` (the clip layout of docs/sources.md), assembled from pre-serialised
    pieces so that writing gigabytes stays fast: ``head`` is its metadata + word tags, ``pool`` holds
    (serialised RLE counts, XYXY box) pairs."""
    picks = rng.choice(len(pool), size=objects, replace=False)
    gme, aes, score = rng.uniform(0.2, 0.5, objects), rng.uniform(3.5, 6.0, objects), rng.uniform(0.7, 1.0, objects)
    anns, mask_map, masks = [], [], []
    for j, p in enumerate(picks, start=1):
        counts, box = pool[p]
        name = json.dumps(_name(i, j))
        anns.append(
            f'{{"class_name": {name}, "bbox": {json.dumps(box)}, "gme_score": {gme[j - 1]:.4f}, '
            f'"aes_score": {aes[j - 1]:.4f}}}'
        )
        mask_map.append(f'"{j}": {{"class_name": {name}}}')
        masks.append(f'"{j}": {{"size": [{H}, {W}], "counts": {counts}, "score": [{score[j - 1]:.4f}]}}')
    return (
        f'{{{head}, "annotation": {{"ann_frame_data": {{"ann_frame_idx": 0, "annotations": [{", ".join(anns)}], '
        f'"box_format": "xyxy", "img_width": {W}, "img_height": {H}, "foreground_ase_score": 4.9, '
        f'"background_ase_score": 4.6}}, "mask_map": {{{", ".join(mask_map)}}}, '
        f'"mask_annotation": {{"0": {{{", ".join(masks)}}}}}}}}}'
    )


def _head(video: str) -> str:
    caption = (
        "The video shows a subject outdoors on a sunny day; the camera stays still while the subject "
        "moves slightly, turning towards the light. "
    ) * 4
    meta = {
        "cut": [0, 95],
        "crop": [0, W, 0, H],
        "tech": 2.0,
        "motion": 0.01,
        "fps": 29.97,
        "num_frames": 95,
        "resolution": {"height": H, "width": W},
        "path": video,
        "aesthetic": 5.0,
        "face_cut": [0, 95],
        "cap": [caption],
        "face_cap_qwen": caption,
    }
    tags = {
        "background": ["grass", "park"],
        "subject": ["person", "woman"],
        "object": ["cup", "bag"],
        "pre_define": ["person", "human head"],
    }
    return f'"metadata": {json.dumps(meta)}, "word_tags": {json.dumps(tags)}'


def clip_key(i: int) -> str:
    return f"vid{i // 4:07d}_segment_{i % 4}_step1-0-95_step2-0-95_step3_step4_step5"


def make_dataset(root: Path, target_bytes: int, *, objects: int = 14, pair_every: int = 50, seed: int = 0) -> dict:
    """Write the tree under ``root``; returns what was written (bytes, clips, pair records)."""
    video_rel = "part_0001/vid/vid_segment_0.mp4"
    _write_video(root / "Videos" / "total_part1" / video_rel)
    jsons = root / "Jsons" / "mask_and_bbox"
    jsons.mkdir(parents=True, exist_ok=True)
    path = jsons / "total_part1.json"
    pool = [(json.dumps(rle["counts"]), box) for rle, box in _mask_pool(64, seed)]
    head = _head(video_rel)
    rng = np.random.default_rng(seed)
    clips, written = 0, 0
    pair_dir = root / "Jsons" / "cross_video_pairs"
    pair_dir.mkdir(parents=True, exist_ok=True)
    pairs = 0
    with open(path, "w") as f:
        f.write("{")
        while written < target_bytes:
            text = (
                ("," if clips else "")
                + json.dumps(clip_key(clips))
                + ": "
                + _clip_text(clips, pool, rng, objects, head)
            )
            f.write(text)
            written += len(text)
            clips += 1
        f.write("}")
    cluster: list[dict] = []
    for i in range(0, clips - 1, pair_every):
        cluster.append(
            {
                "cur_id": f"total_part1/{clip_key(i)}",
                "aft_id": f"total_part1/{clip_key(i + 1)}",
                "cur_class_id": "1",
                "aft_class_id": "1",
                "cur_class_name": _name(i, 1),
                "aft_class_name": _name(i + 1, 1),
                "text_similarity": 1.0,
                "image_similarity": 0.9,
                "cur_frame_idx": 0,
                "aft_frame_idx": 0,
            }
        )
        pairs += 1
        if len(cluster) == 1000:
            (pair_dir / f"cluster{pairs // 1000:05d}.json").write_text(json.dumps(cluster))
            cluster = []
    if cluster:
        (pair_dir / f"cluster{pairs // 1000 + 1:05d}.json").write_text(json.dumps(cluster))
    (pair_dir / "cluster_videos.json").write_text(json.dumps({"vid": [f"total_part1/{clip_key(0)}"]}))
    return {"file_bytes": path.stat().st_size, "clips": clips, "pair_records": pairs}


def _write_video(path: Path) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


_MEM = r"""
import os, resource

def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None

def reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS of this process) to the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def mem(base_rss, reset):
    return {"baseline_rss_kb": base_rss, "peak_rss_kb": status_kb("VmHWM"), "hwm_reset": reset,
            "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
"""

_CHILD_READER = (
    _MEM
    + r"""
import json, sys, time
import ijson, sqlite3, numpy, pycocotools.mask  # imported before the baseline
from pipeline.records import Reject
from pipeline.sources import opens2v
cfg = json.loads(sys.argv[1])
base, reset = status_kb("VmRSS"), reset_peak()
t = time.perf_counter()
records = rejects = 0
for item in opens2v.read(cfg):
    if isinstance(item, Reject):
        rejects += 1
    else:
        records += 1
print(json.dumps({**mem(base, reset), "seconds": time.perf_counter() - t, "records": records, "rejects": rejects}))
"""
)

_CHILD_WHOLE = (
    _MEM
    + r"""
import json, sys, time
base, reset = status_kb("VmRSS"), reset_peak()
t = time.perf_counter()
with open(sys.argv[1]) as f:
    data = json.load(f)
print(json.dumps({**mem(base, reset), "seconds": time.perf_counter() - t, "clips": len(data)}))
"""
)


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(r: dict) -> dict:
    """RSS figures of a child in MiB. ``peak`` is the child's VmHWM (reset to the current RSS after its
    imports); ``ru_maxrss`` is also kept, but on Linux it starts from the parent's peak at fork, so it
    cannot show a child smaller than this (numpy-importing) benchmark process."""
    out = {
        "baseline_rss_mib": r["baseline_rss_kb"] / 1024,
        "peak_rss_mib": r["peak_rss_kb"] / 1024,
        "growth_mib": (r["peak_rss_kb"] - r["baseline_rss_kb"]) / 1024,
        "ru_maxrss_mib": r["ru_maxrss_kb"] / 1024,
        "peak_reset_after_imports": r["hwm_reset"],
        "seconds": r["seconds"],
    }
    return out


def measure_reader(root: Path, *, cross: bool = True, **options) -> dict:
    """Run the reader over ``root`` in a child process (intra, and cross when asked; ``options`` are
    more reader options); RSS in MiB."""
    cfg = {"root": str(root), "work_dir": str(root), **options}
    if cross:
        cfg["cross_pairs"] = "Jsons/cross_video_pairs/*.json"
    r = _child(_CHILD_READER, json.dumps(cfg))
    return {**_mib(r), "records": r["records"], "rejects": r["rejects"]}


def measure_whole_file(path: Path) -> dict:
    """``json.load`` of the whole file in a child process (what the reader did before); RSS in MiB."""
    return _mib(_child(_CHILD_WHOLE, str(path)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.5, help="size of the generated annotation file (GB, 1e9 bytes)")
    ap.add_argument("--dir", default=None, help="where the temp folder goes (default: the system temp dir)")
    ap.add_argument("--pair-every", type=int, default=50, help="one pair record per this many clips")
    ap.add_argument("--whole-file-mb", type=float, default=0, help="also measure json.load on a file this big (MB)")
    ap.add_argument("--json", default=None, help="write the result here too")
    args = ap.parse_args(argv)
    target = int(args.gb * 1e9)
    base_dir = args.dir or tempfile.gettempdir()
    free = shutil.disk_usage(base_dir).free
    if free < 1.3 * target + 2e9:
        raise SystemExit(
            f"{base_dir} has {free / 1e9:.1f} GB free; need about {1.3 * target / 1e9 + 2:.1f} GB for --gb {args.gb}"
        )
    result: dict = {"python": sys.version.split()[0]}
    work = Path(tempfile.mkdtemp(prefix="bench-opens2v-", dir=base_dir))
    try:
        t = time.perf_counter()
        result["dataset"] = make_dataset(work / "big", target, pair_every=args.pair_every)
        result["dataset"]["write_seconds"] = time.perf_counter() - t
        result["reader"] = measure_reader(work / "big")
        shutil.rmtree(work / "big")
        if args.whole_file_mb:
            small = make_dataset(work / "small", int(args.whole_file_mb * 1e6), pair_every=args.pair_every)
            result["whole_file"] = {
                "file_bytes": small["file_bytes"],
                **measure_whole_file(work / "small" / "Jsons" / "mask_and_bbox" / "total_part1.json"),
            }
            result["whole_file_reader"] = measure_reader(work / "small")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
