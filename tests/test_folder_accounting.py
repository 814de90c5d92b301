"""The folder source accounts for every file it meets (#33): links that are broken, loop, leave the root
or name a folder, formats Pillow needs a plugin for, files that are no image; and one spelling of the
root, so a relative and an absolute root resume the same dataset.

The curation runs use the model-free stage list of tests/test_curation_reliability.py (decode + one
sample per image), each well under a second."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.recipe import Recipe
from pipeline.records import Reject, SourceRecord
from pipeline.sources.common import SourceError
from tests.test_curation_reliability import make_recipe, run, write_images


def messy_folder(tmp_path: Path) -> Path:
    """A folder as a phone and a careless user leave it (each case of the issue, one file each)."""
    root = write_images(tmp_path / "photos", 0, names=("a", "b"))
    outside = write_images(tmp_path / "elsewhere", 1, names=("secret",))
    (root / "a.txt").write_text("a caption\n")  # a caption: consumed, not an input
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "leak.png").symlink_to(outside / "secret.png")
    (root / "inner.png").symlink_to(root / "a.png")  # a link that stays inside the root is an input
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "again").symlink_to(root, target_is_directory=True)  # a folder link back into the root
    from pipeline.image_formats import heif_ready

    assert heif_ready()  # registers pillow-heif with Pillow, for the encoder below too
    heic = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(heic, format="HEIF")
    (root / "phone.heic").write_bytes(heic.getvalue())
    (root / "notes.md").write_text("not a picture")
    (root / "orphan.txt").write_text("caption of nothing")
    os.mkfifo(root / "pipe.jpg")  # never opened: reading it would block for ever
    (root / ".hidden.jpg").write_bytes(b"x")  # hidden: not an input, as before
    return root


def test_every_file_of_the_folder_is_an_input_or_a_reject_with_its_reason(tmp_path):
    pytest.importorskip("pillow_heif")
    root = messy_folder(tmp_path)
    out = tmp_path / "ds"
    m, pair = run(make_recipe(root), out)
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert sorted(pair.seen) == ["a", "b", "inner", "phone"]  # HEIC decoded through pillow-heif
    assert {k: v["reason"].split(":")[0] for k, v in rejects.items()} == {
        "broken.jpg": "broken symlink",
        "loop.jpg": "symlink loop",
        "leak.png": "leak.png is a symlink resolving outside the source root; copy the file into the root instead "
        "of linking it",
        "linked_dir": "folder link not followed",
        "again": "folder link not followed",
        "notes.md": "not an image",
        "orphan.txt": "caption without an image",
        "pipe.jpg": "not a regular file",
    }
    assert all(r["stage"] == "read" and r["source"] == "folder" for r in rejects.values())
    assert "leads outside the source root" in rejects["linked_dir"]["reason"]
    assert "leads to '.' inside the root" in rejects["again"]["reason"]
    t = m["totals"]
    assert t["inputs"] == t["accepted"] + t["rejected"] == 4 + 8
    # every non-hidden entry of the folder is named by a sample or a reject (a.txt is a's caption)
    named = set(pair.seen) | {k.rsplit(".", 1)[0] for k in rejects} | {"a"}
    assert {p.name.rsplit(".", 1)[0] for p in root.iterdir() if not p.name.startswith(".")} <= named


def test_heic_without_the_plugin_is_a_reject_naming_the_package(tmp_path, monkeypatch):
    from pipeline import image_formats
    from pipeline.sources import folder

    root = write_images(tmp_path / "photos", 0, names=("a",))
    (root / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "pic.avif").write_bytes(b"\0\0\0\x1cftypavif")
    monkeypatch.setattr(image_formats, "heif_ready", lambda: False)
    monkeypatch.setattr(image_formats, "avif_ready", lambda: False)
    out = list(folder.read({"root": str(root)}))
    assert [r.id for r in out if isinstance(r, SourceRecord)] == ["a"]
    assert [(r.id, r.reason) for r in out if isinstance(r, Reject)] == [
        (
            "phone.HEIC",
            (
                "unsupported format: phone.HEIC: .heic (HEIC/HEIF) needs the pillow-heif plugin to decode; "
                "pip install pillow-heif"
            ),
        ),
        (
            "pic.avif",
            (
                "unsupported format: pic.avif: .avif (AVIF) needs a Pillow built with AVIF support; "
                "pip install 'pillow>=11.2'"
            ),
        ),
    ]


def test_avif_decodes_with_this_pillow(tmp_path):
    from pipeline import image_formats
    from pipeline.stages.decode import decode_image

    if not image_formats.avif_ready():
        pytest.skip("this Pillow has no AVIF codec")
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(buf, format="AVIF")
    assert decode_image(buf.getvalue()).shape == (12, 20, 3)


def test_a_folder_of_nothing_readable_is_a_source_error_saying_what_it_holds(tmp_path):
    from pipeline.sources import folder

    root = tmp_path / "photos"
    root.mkdir()
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    with pytest.raises(
        SourceError, match=r"no image file .* it holds 1 other file\(s\), e.g. broken symlink: broken.jpg"
    ):
        folder.read({"root": str(root)})


def test_non_recursive_walk_does_not_count_subfolders_or_folder_links(tmp_path):
    from pipeline.sources import folder

    root = write_images(tmp_path / "photos", 0, names=("a",))
    write_images(root / "sub", 1, names=("b",))
    (root / "link").symlink_to(root / "sub", target_is_directory=True)
    ids = [(type(r).__name__, r.id) for r in folder.read({"root": str(root), "recursive": False})]
    assert ids == [("SourceRecord", "a")]


def test_relative_and_absolute_root_resume_with_no_shard_rewritten(tmp_path, monkeypatch):
    root = write_images(tmp_path / "photos", 0)
    out = tmp_path / "ds"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    m1, first = run(make_recipe(Path("../photos")), out)
    assert sorted(first.seen) == ["a", "b", "c"] and m1["source"]["root"] == str(root.resolve())
    shards = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "shards").iterdir()}
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    for spelling in (root, tmp_path / "alias", Path("../photos/")):
        m2, again = run(make_recipe(spelling), out)
        assert again.seen == [] and m2 == m1  # every chunk kept, manifest the same
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "shards").iterdir()} == shards


def test_recipe_keeps_a_local_root_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    assert Recipe.from_dict({"source": {"kind": "folder", "root": "p/../p"}}).source.root == str(
        tmp_path.resolve() / "p"
    )
    assert Recipe.from_dict({"source": {"kind": "folder", "root": "s3://b/x"}}).source.root == "s3://b/x"
    yaml = tmp_path / "r.yaml"
    yaml.write_text("source: {kind: folder, root: ./p}\n")
    assert Recipe.from_yaml(yaml).source.root == str(tmp_path.resolve() / "p")
    assert Recipe.from_yaml(yaml, source_root="p").source.root == str(tmp_path.resolve() / "p")


def test_guard_sees_a_link_out_of_a_root_given_through_a_symlinked_spelling(tmp_path):
    """A reader that resolved the root names files under the real root; the guard still checks them."""
    from pipeline.inputs import guard_records
    from pipeline.records import ImageRef

    root = write_images(tmp_path / "photos", 0, names=("a",))
    (root / "leak.png").symlink_to(write_images(tmp_path / "elsewhere", 1, names=("s",)) / "s.png")
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    recs = [
        SourceRecord(source="x", id=n, image=ImageRef(path=str(root.resolve() / f"{n}.png"))) for n in ("a", "leak")
    ]
    out = list(guard_records(recs, str(tmp_path / "alias")))
    assert isinstance(out[0], SourceRecord)
    assert isinstance(out[1], Reject) and out[1].reason.startswith(
        "leak.png is a symlink resolving outside the source root"
    )


# ---- semantically empty recipe values -------------------------------------------------------------


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"detection": {"prompt": ""}},
            "recipe field 'detection.prompt' = '': names no phrase; give phrases separated by",
        ),
        ({"detection": {"prompt": " . "}}, "recipe field 'detection.prompt' = ' . ': names no phrase"),
        ({"human": {"face_prompt": " "}}, "recipe field 'human.face_prompt' = ' ': names nothing"),
        ({"human": {"phrases": []}}, r"recipe field 'human.phrases' = \[\]: is empty; .*human.face_prob: 0"),
        ({"human": {"phrases": ["man", ""]}}, r"recipe field 'human.phrases\[1\]' = '': names nothing"),
        ({"captioning": {"template": ""}}, "recipe field 'captioning.template' = '': is blank"),
        (
            {"source": {"kind": "folder", "root": "/x", "phrase": " . "}},
            "folder source: source.phrase = ' . ' names nothing",
        ),
        (
            {"source": {"kind": "vitonhd", "root": "/x", "phrase": "  "}},
            "vitonhd source: source.phrase = '  ' names nothing",
        ),
        ({"source": {"kind": "synth", "phrase": " "}}, "synth source: source.phrase = ' ' names nothing"),
        ({"source": {"kind": "ffhq", "root": "/x", "category": []}}, "ffhq source: source.category is an empty list"),
        (
            {"source": {"kind": "anyinsertion", "root": "/x", "categories": ["cloth", ""]}},
            r"anyinsertion source: source.categories\[1\] = '' names nothing",
        ),
        (
            {"source": {"kind": "subjects200k", "root": "/x", "collections": []}},
            "subjects200k source: source.collections is an empty list, which selects nothing",
        ),
    ],
)
def test_a_value_that_says_nothing_is_a_one_line_recipe_error(tmp_path, over, message):
    from dynaip.configs import ConfigError

    raw = {"source": {"kind": "folder", "root": "/x"}, **over}
    with pytest.raises(ConfigError, match=message) as e:
        Recipe.from_dict(raw)
    assert "\n" not in str(e.value)
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"^recipe '{path}': "):
        Recipe.from_yaml(path)


def test_blank_template_is_fine_when_no_caption_uses_it():
    r = Recipe.from_dict(
        {"source": {"kind": "folder", "root": "/x"}, "captioning": {"template": "", "order": ["provided", "model"]}}
    )
    assert r.captioning.template == ""
