"""User errors of the curation commands end in one line naming the thing and the fix: exit code != 0,
a single stderr line, no traceback (#19). Each case runs the real entry point in its own process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def dataset_with(root: Path, manifest: object, shard: bytes | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    if shard is not None:
        (root / "shards").mkdir()
        (root / "shards" / "000000.tar").write_bytes(shard)
    return root


def symlink_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("k-0.ref.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    return buf.getvalue()


def test_user_errors_are_one_line_without_a_traceback(tmp_path):
    from pipeline.demo_photos import write_sample_photos

    photos = tmp_path / "photos"
    write_sample_photos(photos, faces=0, names=["astronaut"])
    (tmp_path / "a-file").write_text("x")
    good = {
        "format": "dynaip-dataset/1",
        "shards": [],
        "totals": {"inputs": 0, "accepted": 0, "rejected": 0, "samples": 0},
    }
    no_totals = dataset_with(tmp_path / "no-totals", {k: v for k, v in good.items() if k != "totals"})
    a_list = dataset_with(tmp_path / "a-list", [good])
    tar = symlink_tar()
    linked = dataset_with(
        tmp_path / "linked",
        {
            **good,
            "shards": [
                {
                    "path": "shards/000000.tar",
                    "samples": 1,
                    "bytes": len(tar),
                    "sha256": hashlib.sha256(tar).hexdigest(),
                }
            ],
        },
        tar,
    )
    demo = str(REPO / "manifests" / "demo.yaml")
    curate = [
        "-m",
        "dynaip.cli",
        "curate",
        "--recipe",
        demo,
        "--source-root",
        str(photos),
        "--executor",
        "local",
        "--no-progress",
    ]
    cases = {
        "no --models": (curate + ["--out", str(tmp_path / "never")], "pass --models"),
        "--out is a file": (curate + ["--out", str(tmp_path / "a-file")], "is a file, not a directory"),
        "no totals": (["-m", "dynaip.cli", "manifest", "verify", str(no_totals)], "has no 'totals' dict"),
        "list manifest": (["-m", "dynaip.cli", "manifest", "show", str(a_list)], "holds a list, not a JSON object"),
        "symlink member": (
            ["-m", "dynaip.cli", "manifest", "grid", str(linked), "--out", str(tmp_path / "g.png")],
            "member 'k-0.ref.png' is a symlink",
        ),
        "job, no recipe": (
            [
                str(REPO / "jobs" / "curate.py"),
                "--recipe",
                str(tmp_path / "missing.yaml"),
                "--out",
                str(tmp_path / "job"),
            ],
            "does not exist; pass an existing YAML",
        ),
    }
    for name, (args, says) in cases.items():
        p = run(args, tmp_path)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode != 0, name
        assert "Traceback" not in p.stderr, (name, p.stderr)
        assert len(lines) == 1 and says in lines[0], (name, p.stderr)
    assert not (tmp_path / "never").exists()  # the run that could not start left no directory
    assert not (tmp_path / "g.png").exists()
