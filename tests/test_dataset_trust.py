"""A dataset from elsewhere is untrusted (docs/security.md, "Datasets from elsewhere"): every reader — the
trainer, feature precompute, `dynaip manifest show/verify/grid` and the web app's Datasets page — goes
through the one strict reader (dynaip/dataset/reader.py) and refuses a dataset built the way an attacker
or a careless user would build it, in one line naming the manifest (or shard), the entry and the rule,
before any byte of it is used: nothing outside the dataset is opened (an audit hook records every file
open), no request is sent (a loopback HTTP server counts them), no traceback."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import os
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from train_fixtures import make_sample, write_dataset

from dynaip.dataset.reader import DatasetError, HashingReader, ShardIntegrityError

# ----------------------------------------------------------------------------- helpers

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while `opened()` is active


@contextlib.contextmanager
def opened() -> Iterator[list[str]]:
    """Every path any code in this process opens inside the block (builtins.open, os.open, io.open)."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


class _Counting(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        _Counting.requests.append(f"GET {self.path}")
        self.send_response(404)
        self.end_headers()

    def do_HEAD(self):
        _Counting.requests.append(f"HEAD {self.path}")
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 that records every request it gets."""
    _Counting.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Counting.requests
    finally:
        server.shutdown()
        server.server_close()


def readers() -> dict[str, Callable[[Path], Any]]:
    """Every way the project reads a finished dataset."""
    from dynaip.dataset.inspect import grid, show, verify
    from dynaip.dataset.manifest import load_manifest
    from dynaip.features.layout import FeatureSpec
    from dynaip.features.precompute import plan_dataset
    from dynaip.serve.datasets import DatasetView
    from dynaip.train.data import read_manifests

    spec = FeatureSpec(fingerprint="f", max_sequence_length=8, dtype="fp32", buckets=((32, 32),))
    return {
        "train": lambda d: read_manifests([str(d)]),
        "precompute": lambda d: plan_dataset(str(d), spec),
        "serve": lambda d: DatasetView.open(d),
        "manifest": lambda d: load_manifest(d),
        "show": lambda d: show(d),
        "verify": lambda d: verify(d),
        "grid": lambda d: grid(d, d.parent / "grid.png"),
    }


def refused_everywhere(d: Path, says: str, outside: Path | None = None) -> None:
    """Every reader raises one line naming the manifest and saying ``says``; none opens ``outside``."""
    for name, read in readers().items():
        with opened() as paths, pytest.raises(DatasetError) as err:
            read(d)
        line = str(err.value)
        assert "\n" not in line and says in line and str(d / "manifest.json") in line, (name, line)
        if outside is not None:
            assert not [p for p in paths if str(outside) in p], (name, paths)
    assert not (d / "features").exists() and not (d.parent / "grid.png").exists()  # refused before writing


def set_entry(d: Path, **changes: Any) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0].update(changes)
    m["shards"][0] = {k: v for k, v in m["shards"][0].items() if v is not ...}
    (d / "manifest.json").write_text(json.dumps(m))


def tar_bytes(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """A tar of ``(name, data, link)``: a regular file when ``link`` is None, else a symlink to ``link``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tf.addfile(info)
            else:
                info.size = len(data or b"")
                tf.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def with_shard(d: Path, data: bytes, samples: int = 1) -> Path:
    """Replaces shard 0 with ``data`` and lists its true size and hash (an attacker writes both)."""
    (d / "shards" / "000000.tar").write_bytes(data)
    set_entry(d, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), samples=samples)
    return d


def sample_members(key: str = "k-0", drop: str | None = None, **replace: bytes) -> list[tuple[str, bytes, None]]:
    files = {**make_sample(0, size=32), **{k.replace("_", "."): v for k, v in replace.items()}}
    return [(f"{key}.{ext}", data, None) for ext, data in files.items() if ext != drop]


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    d = write_dataset(tmp_path / "ds", [1], size=32)
    m = json.loads((d / "manifest.json").read_text())
    m["totals"]["samples"] = 1  # what curation writes (verify checks it)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid shard outside the dataset (what a manifest from elsewhere would point at)."""
    src = write_dataset(tmp_path / "elsewhere", [1], size=32)
    return src / "shards" / "000000.tar"


# ----------------------------------------------------------------------------- shard paths


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested-dotdot"])
def test_a_shard_path_leading_out_of_the_dataset_is_refused_and_never_opened(ds, outside, kind):
    path = {
        "absolute": str(outside),
        "dotdot": "../elsewhere/shards/000000.tar",
        "nested-dotdot": "shards/../../elsewhere/shards/000000.tar",
    }[kind]
    set_entry(ds, path=path)
    says = "is an absolute path" if kind == "absolute" else "climbs out with '..'"
    refused_everywhere(ds, says, outside.parent)


def test_a_url_shard_path_is_refused_and_no_request_is_sent(ds, http_server):
    base, requests = http_server
    set_entry(ds, path=f"{base}/x.tar")
    refused_everywhere(ds, "names a URL")
    set_entry(ds, path="file:///etc/passwd")
    refused_everywhere(ds, "names a URL")
    assert requests == []


def test_a_shard_that_is_a_symlink_out_of_the_dataset_is_refused_and_never_opened(ds, outside):
    shard = ds / "shards" / "000000.tar"
    shard.unlink()
    shard.symlink_to(outside)  # the manifest's path looks fine; the file it names is elsewhere
    refused_everywhere(ds, "resolves through a symlink to", outside.parent)
    from dynaip.train.data import read_manifests

    with pytest.raises(DatasetError, match="resolves through a symlink to"):  # a file:// root is a local root
        read_manifests([f"file://{ds}"])


def test_a_symlinked_shard_inside_the_dataset_is_read(ds):
    from dynaip.train.data import iter_tar, read_manifests

    shard = ds / "shards" / "000000.tar"
    shard.rename(ds / "shards" / "real.tar")
    shard.symlink_to("real.tar")
    (ref,) = read_manifests([str(ds)])
    with opened() as paths:  # the audit hook sees the shard being opened (so its silence elsewhere means something)
        keys = [r["__key__"] for r in iter_tar(ref.url, count=1, sha256=ref.sha256, size=ref.bytes)]
    assert keys == [b"test-000000-0"] and str(shard) in paths


@pytest.mark.parametrize(
    "path, says",
    [
        ("shards/a%2e%2e.tar", "has segment 'a%2e%2e.tar'"),
        ("shards/x.tar?y=1", "has segment 'x.tar?y=1'"),
        ("shards//x.tar", "has segment ''"),
        ("~/x.tar", "is an absolute path"),
        (7, "has no 'path' string"),
    ],
)
def test_odd_shard_paths_are_refused(ds, path, says):
    set_entry(ds, path=path)
    refused_everywhere(ds, says)


# ----------------------------------------------------------------------------- entry fields


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("sha256", ..., "has 'sha256' None, not 64 lowercase hex digits"),
        ("sha256", "abc", "has 'sha256' 'abc'"),
        ("bytes", ..., "has 'bytes' None, not a non-negative integer"),
        ("samples", "4", "has 'samples' '4', not a non-negative integer"),
        ("bytes", True, "has 'bytes' True"),
        ("samples", -1, "has 'samples' -1"),
    ],
)
def test_an_entry_without_a_hash_or_size_or_with_wrong_types_is_refused(ds, field, value, says):
    set_entry(ds, **{field: value})
    refused_everywhere(ds, f"shard entry 0 ('shards/000000.tar') {says}")


def test_a_manifest_whose_shards_are_not_a_list_of_objects_is_refused(ds):
    m = json.loads((ds / "manifest.json").read_text())
    for shards, says in (({"a": 1}, "'shards' is dict, not a list"), ([["x"]], "shard entry 0 is a list")):
        (ds / "manifest.json").write_text(json.dumps({**m, "shards": shards}))
        refused_everywhere(ds, says)


# ----------------------------------------------------------------------------- shard contents


def _train_reads(d: Path) -> tuple[list[Any], BaseException | None]:
    """What the trainer's reader yields from shard 0 before it stops (nothing, when the shard is refused)."""
    from dynaip.train import shard_integrity
    from dynaip.train.data import iter_tar, read_manifests

    shard_integrity.reset()
    (ref,) = read_manifests([str(d)])
    got: list[Any] = []
    try:  # extend keeps what came before an exception
        got.extend(iter_tar(ref.url, count=ref.samples, sha256=ref.sha256, size=ref.bytes))
    except ValueError as e:
        return got, e
    finally:
        shard_integrity.reset()
    return got, None


def shard_refused(d: Path, says: str) -> None:
    """The trainer yields no sample and stops with one line; show, grid, serve and verify say the same."""
    from dynaip.dataset.inspect import grid, show, verify
    from dynaip.serve.datasets import DatasetView

    got, err = _train_reads(d)
    assert got == [] and err is not None and says in str(err) and "\n" not in str(err), (got, err)
    for read in (show, lambda x: grid(x, x.parent / "g.png"), DatasetView.open):
        with pytest.raises(DatasetError, match=None) as e:
            read(d)
        assert says in str(e.value) and "\n" not in str(e.value) and "000000.tar" in str(e.value)
    problems = verify(d)
    assert len(problems) == 1 and problems[0].startswith("shards/000000.tar: ") and says in problems[0], problems


def test_a_symlink_member_is_refused(ds):
    with_shard(ds, tar_bytes([*sample_members(), ("k-0.extra.png", None, "/etc/passwd")]))
    shard_refused(ds, "member 'k-0.extra.png' is a symlink")
    with_shard(ds, tar_bytes([("k-0.ref.png", None, "/etc/passwd"), *sample_members(drop="ref.png")]))
    shard_refused(ds, "member 'k-0.ref.png' is a symlink")


def test_a_member_name_climbing_out_is_refused(ds):
    with_shard(ds, tar_bytes(sample_members(key="../outside/k-0")))
    shard_refused(ds, "member '../outside/k-0.ref.png' is not named KEY.EXT")


def test_a_sample_without_its_reference_is_refused(ds):
    with_shard(ds, tar_bytes(sample_members(drop="ref.png")))
    shard_refused(ds, "sample 'k-0' lacks ref.png")


def test_a_json_member_that_is_a_list_or_not_json_is_refused(ds):
    with_shard(ds, tar_bytes(sample_members(json=b"[1, 2]")))
    shard_refused(ds, "k-0.json holds a list, not a JSON object")
    with_shard(ds, tar_bytes(sample_members(json=b"{not json")))
    shard_refused(ds, "k-0.json is not valid JSON")


def test_a_member_twice_or_a_sample_split_apart_is_refused(ds):
    members = sample_members()
    with_shard(ds, tar_bytes([*members, members[0]]))
    shard_refused(ds, "member k-0.ref.png appears twice")
    other = sample_members(key="k-1")
    with_shard(ds, tar_bytes([*members[:2], *other, *members[2:]]), samples=2)
    got, err = _train_reads(ds)  # the trainer groups as it streams: the split sample is incomplete at once
    assert got == [] and "sample 'k-0' lacks" in str(err)


def test_changed_bytes_are_refused_before_any_sample_is_used(ds):
    data = bytearray((ds / "shards" / "000000.tar").read_bytes())
    data[len(data) // 3] ^= 1
    (ds / "shards" / "000000.tar").write_bytes(bytes(data))
    shard_refused(ds, "has sha256")


def test_a_longer_shard_fails_as_soon_as_it_passes_the_listed_size(ds):
    good = (ds / "shards" / "000000.tar").read_bytes()
    set_entry(ds, bytes=len(good) - 1024)
    from dynaip.dataset.manifest import open_dataset

    (ref,) = open_dataset(ds).shards
    with open(ref.url, "rb") as f:
        r = HashingReader(f, ref.bytes, ref.sha256, "shard x")
        r.read(ref.bytes)  # up to the listed size: fine
        with pytest.raises(ShardIntegrityError, match=f"shard x is longer than the {ref.bytes} bytes"):
            r.read(1)
    shard_refused(ds, "bytes")


def test_an_undecodable_image_is_named_by_verify_and_grid_and_skipped_by_training(ds):
    from dynaip.dataset.inspect import grid, verify
    from dynaip.serve.app import samples_html
    from dynaip.serve.datasets import DatasetView

    with_shard(ds, tar_bytes(sample_members(tgt_jpg=b"\xff\xd8 not a jpeg")))
    assert [p.split(" (")[0] for p in verify(ds)] == [
        f"shards/000000.tar: shard {ds}/shards/000000.tar: k-0.tgt.jpg does not decode"
    ]
    with pytest.raises(ValueError, match=r"sample 'k-0' has an image that does not decode \(UnidentifiedImageError"):
        grid(ds, ds.parent / "g.png")
    view = DatasetView.open(ds)  # the index reads json and txt only; the card says what is wrong
    html = samples_html(view, view.samples(), 1, 1, 1)
    assert 'data-error="1"' in html and "k-0 has an image that does not decode" in html
    got, err = _train_reads(ds)  # a well-formed shard: the sample reaches decoding, which skips it (counted)
    assert err is None and len(got) == 1 and got[0]["tgt.jpg"].startswith(b"\xff\xd8 not")


def test_manifest_verify_passes_a_good_dataset_and_show_tolerates_missing_descriptions(ds, capsys):
    from dynaip.cli import main
    from dynaip.dataset.inspect import show, verify

    assert verify(ds) == []
    assert main(["manifest", "verify", str(ds)]) == 0
    m = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**m, "source": "x", "recipe": [1], "totals": {"inputs": 1}}))
    text = show(ds)  # no KeyError 'source' / 'recipe_hash' / 'samples'
    assert "source   -  -" in text and "inputs   1" in text


def test_the_cli_says_one_line_for_a_damaged_dataset(ds, caplog):
    from dynaip.cli import main

    with_shard(ds, tar_bytes(sample_members(json=b"[1]")))
    for argv in (["manifest", "show", str(ds)], ["manifest", "grid", str(ds), "--out", str(ds.parent / "g.png")]):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(argv) == 2
        (rec,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "k-0.json holds a list" in rec.getMessage() and "\n" not in rec.getMessage() and rec.exc_info is None
    set_entry(ds, sha256=...)
    caplog.clear()
    assert main(["manifest", "verify", str(ds)]) == 2
    assert "has 'sha256' None" in caplog.records[-1].getMessage()


# ----------------------------------------------------------------------------- remote roots


def test_a_remote_dataset_is_named_by_its_root_and_its_shards_resolve_under_it(ds, tmp_path):
    """An fsspec root (memory:// here, as s3:// or https://): shard URLs are the root + the relative path."""
    import fsspec

    from dynaip.train.data import iter_tar, read_manifests

    fs = fsspec.filesystem("memory")
    for p in (ds / "manifest.json", ds / "shards" / "000000.tar"):
        fs.pipe(f"/trust-ds/{p.relative_to(ds)}", p.read_bytes())
    try:
        (ref,) = read_manifests(["memory://trust-ds/"])
        assert ref.url == "memory://trust-ds/shards/000000.tar"
        assert [r["__key__"] for r in iter_tar(ref.url, count=1, sha256=ref.sha256, size=ref.bytes)] == [
            b"test-000000-0"
        ]
        m = json.loads((ds / "manifest.json").read_text())
        m["shards"][0]["path"] = "memory://other/shards/000000.tar"
        fs.pipe("/trust-ds/manifest.json", json.dumps(m).encode())
        with pytest.raises(DatasetError, match="memory://trust-ds/manifest.json: shard entry 0 .* names a URL"):
            read_manifests(["memory://trust-ds"])
    finally:
        fs.rm("/trust-ds", recursive=True)


def test_an_http_dataset_reads_only_under_its_root(tmp_path):
    """A dataset served over HTTP on loopback: the trainer's reader asks for the manifest and the shards
    under the root the user gave, and nothing else."""
    from dynaip.train.data import iter_tar, read_manifests

    served = write_dataset(tmp_path / "www" / "ds", [1], size=32)
    seen: list[str] = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **k: Any):
            super().__init__(*a, directory=str(tmp_path / "www"), **k)

        def send_head(self):
            seen.append(self.path)
            return super().send_head()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}/ds"
        (ref,) = read_manifests([root])
        assert ref.url == f"{root}/shards/000000.tar"
        assert len(list(iter_tar(ref.url, count=1, sha256=ref.sha256, size=ref.bytes))) == 1
        m = json.loads((served / "manifest.json").read_text())
        m["shards"][0]["path"] = f"http://127.0.0.1:{server.server_address[1]}/secret.tar"
        (served / "manifest.json").write_text(json.dumps(m))
        seen_before = len(seen)
        with pytest.raises(DatasetError, match="names a URL"):
            read_manifests([root])
        after = seen[seen_before:]  # fsspec may ask for the manifest twice (HEAD and GET)
        assert all(p.startswith("/ds/") for p in seen) and after and set(after) == {"/ds/manifest.json"}
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- the web app's rejects panel


@pytest.mark.parametrize("rid", ["../outside/secret", "ABS", "sub/../../outside/secret", "*"])
def test_a_rejects_id_outside_the_source_folder_shows_nothing(tmp_path, ds, rid, caplog):
    from PIL import Image

    from dynaip.serve.app import rejects_html
    from dynaip.serve.datasets import DatasetView

    photos, secret = tmp_path / "photos", tmp_path / "outside" / "secret.jpg"
    photos.mkdir()
    secret.parent.mkdir()
    Image.new("RGB", (8, 8), "red").save(secret)
    Image.new("RGB", (8, 8), "blue").save(photos / "fine.jpg")
    rid = str(tmp_path / "outside" / "secret") if rid == "ABS" else rid
    m = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**m, "source": {"kind": "folder", "root": str(photos)}}))
    (ds / "rejects.jsonl").write_text(
        json.dumps({"id": rid, "stage": "decode", "reason": "r"})
        + "\n"
        + json.dumps({"id": "fine", "stage": "decode", "reason": "r"})
        + "\n"
    )
    view = DatasetView.open(ds)
    with opened() as paths, caplog.at_level(logging.WARNING):
        assert view.reject_image(view.rejects()[0]) is None
        html = rejects_html(view, None)
    assert not [p for p in paths if p.startswith(str(secret.parent))], paths
    assert html.count("<img") == 1  # only the image inside the source folder
    assert view.reject_image(view.rejects()[1]).size == (8, 8)
    assert any("not a relative path inside the source folder" in r.getMessage() for r in caplog.records)


def test_a_rejects_file_link_out_of_the_source_folder_shows_nothing(tmp_path, ds):
    from PIL import Image

    from dynaip.serve.datasets import DatasetView

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "secret.jpg")
    (photos / "x.jpg").symlink_to(tmp_path / "secret.jpg")
    m = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**m, "source": {"kind": "folder", "root": str(photos)}}))
    (ds / "rejects.jsonl").write_text(json.dumps({"id": "x", "stage": "read", "reason": "r"}) + "\n")
    view = DatasetView.open(ds)
    assert view.reject_image(view.rejects()[0]) is None


def test_a_rejects_line_that_is_not_an_object_is_one_line(ds):
    from dynaip.serve.datasets import DatasetView

    (ds / "rejects.jsonl").write_text('{"id": "a"}\n[1]\n')
    with pytest.raises(ValueError, match=r"rejects\.jsonl line 2 is a list, not a JSON object"):
        DatasetView.open(ds)


def test_a_dataset_rule_error_inside_a_ray_failure_is_cut_to_its_own_line():
    from dynaip.train.trainer import _integrity_line

    worker = RuntimeError(
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "dynaip.dataset.format.DatasetError: shard /d/000000.tar: member 'k-0.ref.png' is a symlink; "
        "a shard holds regular files only\n"
    )
    assert _integrity_line(worker) == (
        "shard /d/000000.tar: member 'k-0.ref.png' is a symlink; a shard holds regular files only"
    )
