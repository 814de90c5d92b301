"""The dataset card: ``README.md`` (and the ``preview.png`` it shows) beside ``manifest.json``, so a
dataset directory is a Hugging Face dataset repository as it is (docs/datasets.md, "The dataset card").

The card is YAML front matter in the Hugging Face dataset-card metadata format, then Markdown:

- ``configs`` → one config whose ``train`` split is ``shards/*.tar``: ``datasets.load_dataset(DIR)``
  (or the hub's viewer) reads the shards with the WebDataset builder, which groups a shard's members
  by the key before the first dot, so ``KEY.ref.png`` … ``KEY.json`` become the columns ``ref.png``,
  ``tgt.jpg``, ``mask.png``, ``txt``, ``json`` (plus the builder's ``__key__`` and ``__url__``);
- ``dataset_info.features`` → those columns' types (the images as ``image``, the caption a string, the
  json the struct of its documented fields: ``JSON_FIELDS``; a field outside it, e.g. the source-specific
  ``extra``, is not a column — read the json member for it);
- ``license`` / ``source_datasets`` → the source's own terms (``pipeline/sources/<kind>.py``'s ``LICENSE``);
- ``size_categories`` from the sample count, ``task_categories`` text-to-image and image-to-image.

The body repeats the manifest's totals, rejects by reason and pair kinds, the quality distributions and
the contact sheet. Both files are written by ``pipeline/writer.py`` just before the manifest (which
stays last), from the manifest being written; every re-run rewrites them with the same bytes. The
quality table reads the json of at most ``QUALITY_SAMPLES`` samples (whole shards, in order) and the
preview the first ``PREVIEW_SAMPLES``, so the card costs a bounded read at any dataset size.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import yaml

from dynaip.dataset.format import MANIFEST, MEMBER_ORDER, SHARDS_DIR
from dynaip.dataset.inspect import QUALITY_KEYS, contact_sheet, quantiles_of
from dynaip.dataset.reader import dataset_root, read_shard, shard_refs
from dynaip.dataset.store import Store

CARD = "README.md"
PREVIEW = "preview.png"
PREVIEW_SAMPLES = 6
QUALITY_SAMPLES = 10_000
"""The quality table covers the first shards up to this many samples (the card says when it is a part)."""

SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
"""The hub's ``size_categories`` values (the last one, past 1B, is ``1B<n<10B``)."""

JSON_FIELDS: tuple[tuple[str, Any], ...] = (
    ("source", "string"),
    ("source_id", "string"),
    ("pair", "string"),
    ("phrase", "string"),
    ("box", ["float64"]),
    ("det_score", "float64"),
    ("mask_area", "int64"),
    ("width", "int64"),
    ("height", "int64"),
    ("recipe", "string"),
    ("caption", "string"),
    ("caption_source", "string"),
    ("caption_model", "string"),
    ("caption_prompt", "string"),
    ("crop_mode", "string"),
    ("ref_box", ["int64"]),
    ("ref_from", "string"),
    ("face_fallback", "bool"),
    ("group", "string"),
    ("quality", tuple((k, "float64") for k in QUALITY_KEYS)),
    ("diptych", (("target_panel", "string"), ("consistency", "float64"), ("padding", "int64"))),
)
"""The sample json's documented fields (docs/ARCHITECTURE.md, "Sample json") as card feature types: a
string is a dtype, a one-item list a list of that dtype, a tuple a struct. Fields a sample lacks are
null in ``datasets``."""

MEMBER_FEATURES = {"ref.png": "image", "tgt.jpg": "image", "mask.png": "image", "txt": "string", "json": JSON_FIELDS}
"""The card's column per shard member: every one of ``MEMBER_ORDER`` (tests/test_curation_e2e.py checks
the two stay in step)."""


def size_category(n: int) -> str:
    """The hub's ``size_categories`` value for ``n`` samples."""
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "1B<n<10B"


def _feature(name: str, kind: Any) -> dict[str, Any]:
    if isinstance(kind, tuple):
        return {"name": name, "struct": [_feature(k, v) for k, v in kind]}
    if isinstance(kind, list):
        return {"name": name, "list": kind[0]}
    return {"name": name, "dtype": kind}


def features() -> list[dict[str, Any]]:
    """``dataset_info.features``: the shard members in ``MEMBER_ORDER``, then the builder's key and url."""
    return [_feature(m, MEMBER_FEATURES[m]) for m in MEMBER_ORDER] + [
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]


def metadata(manifest: dict[str, Any], licenses: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's YAML front matter (a dict in a fixed key order)."""
    t = manifest["totals"]
    ids = list(dict.fromkeys(str(lic.get("license") or "unknown") for lic in licenses)) or ["unknown"]
    meta: dict[str, Any] = {"license": ids[0] if len(ids) == 1 else ids}
    other = next((lic for lic in licenses if lic.get("license") == "other"), None)
    if other is not None:  # the hub's fields for terms without a license id
        meta["license_name"] = other.get("license_name") or "other"
        if other.get("url"):
            meta["license_link"] = other["url"]
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    meta.update(
        {
            "pretty_name": str(recipe.get("name") or "DynaIP dataset"),
            "task_categories": ["text-to-image", "image-to-image"],
            "tags": ["dynaip", "subject-driven-generation", "webdataset"],
            "size_categories": [size_category(int(t.get("samples") or 0))],
            "source_datasets": [str(lic.get("hub_id") or lic.get("name") or "unknown") for lic in licenses]
            or ["unknown"],
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{SHARDS_DIR}/*.tar"}]}],
            "dataset_info": {
                "features": features(),
                "splits": [
                    {"name": "train", "num_bytes": int(t.get("bytes") or 0), "num_examples": int(t.get("samples") or 0)}
                ],
            },
        }
    )
    return meta


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def body(
    manifest: dict[str, Any], licenses: list[dict[str, Any]], quality: dict[str, Any], covered: int, preview: bool
) -> str:
    """The card's Markdown: what the dataset is, its totals, rejects, quality, preview, columns, loading."""
    t = manifest["totals"]
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    name = recipe.get("name") or "DynaIP dataset"
    out = [
        f"# {name}",
        "",
        "Reference → target training pairs for DynaIP, curated by `dynaip curate` "
        f"(format `{manifest.get('format')}`, recipe hash `{manifest.get('recipe_hash', '-')}`, dataset id "
        f"`{manifest.get('dataset_id', '-')}`, source kind `{source.get('kind', '-')}`). `{MANIFEST}` lists "
        "every shard with its sample count, size and sha256; `dynaip manifest verify DIR` checks them.",
        "",
        "## Totals",
        "",
    ]
    out += _table(
        ["inputs", "accepted", "rejected", "samples", "shards", "bytes"],
        [
            [
                t.get("inputs"),
                t.get("accepted"),
                t.get("rejected"),
                t.get("samples"),
                len(manifest.get("shards") or []),
                t.get("bytes"),
            ]
        ],
    )
    pairs = t.get("pairs") if isinstance(t.get("pairs"), dict) else {}
    if pairs:
        out += ["", "Samples per pair kind: " + ", ".join(f"{k} {v}" for k, v in pairs.items()) + "."]
    reasons = t.get("rejected_by_reason") if isinstance(t.get("rejected_by_reason"), dict) else {}
    out += ["", "## Rejects by reason", ""]
    out += _table(["stage: reason", "inputs"], [[r, n] for r, n in reasons.items()]) if reasons else ["None."]
    out += ["", "## Quality", ""]
    if quality:
        part = "" if covered >= int(t.get("samples") or 0) else f" (the first {covered} samples, whole shards in order)"
        out += [
            f"Per source: n, min / p10 / median / p90 / max of each score in the sample json's `quality`{part}; "
            "docs/curation_quality.md of the DynaIP repository says what each score is.",
            "",
        ]
        rows = [
            [src, k, n, " / ".join(f"{v:.4g}" for v in q)]
            for src, scores in quality.items()
            for k in QUALITY_KEYS
            if k in scores
            for n, q in [scores[k]]
        ]
        out += _table(["source", "score", "n", "min / p10 / median / p90 / max"], rows)
    else:
        out += ["No quality scores in the samples."]
    if preview:
        out += [
            "",
            "## Preview",
            "",
            "The first samples: reference | target | mask over the target, caption below.",
            "",
            f"![preview]({PREVIEW})",
        ]
    out += [
        "",
        "## Columns",
        "",
        f"Each sample is one key `KEY` in a WebDataset shard (`{SHARDS_DIR}/NNNNNN.tar`) with the members "
        + ", ".join(f"`KEY.{m}`" for m in MEMBER_ORDER)
        + "; the `datasets` WebDataset builder makes them "
        "the columns below (plus `__key__` and `__url__`).",
        "",
    ]
    out += _table(
        ["column", "what"],
        [
            ["`ref.png`", "reference: the subject on white (RGB PNG)"],
            ["`tgt.jpg`", "target image (RGB JPEG)"],
            ["`mask.png`", "subject mask in target pixels (L PNG, 0/255)"],
            ["`txt`", "caption (UTF-8)"],
            [
                "`json`",
                "sample metadata: "
                + ", ".join(f"`{k}`" for k, _ in JSON_FIELDS)
                + " (the source-specific `extra` is in the json member only)",
            ],
        ],
    )
    out += ["", "## Licenses", ""]
    out += _table(
        ["source", "license", "terms", "note"],
        [
            [
                lic.get("name", "-"),
                lic.get("license_name") or lic.get("license", "unknown"),
                lic.get("url", "-"),
                lic.get("note", ""),
            ]
            for lic in licenses
        ]
        or [["-", "unknown", "-", ""]],
    )
    out += [
        "",
        "The samples are cut from the source's images: they come under the source's terms above.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("OWNER/NAME", split="train")   # or load_dataset("path/to/this/directory")',
        "```",
        "",
        "Training reads the directory (or a URL of it) as it is: `dynaip train --data DIR` "
        '(the README of the DynaIP repository, "Train").',
        "",
    ]
    return "\n".join(out)


def _samples(refs: list, keep_images: bool, limit: int) -> Iterator[dict[str, Any]]:
    """Samples of the first shards (each read whole and checked) until ``limit`` were given."""
    given = 0
    for ref in refs:
        for key, members in read_shard(ref, keep=lambda ext: keep_images or ext == "json"):
            if given >= limit:
                return
            given += 1
            yield {"key": key, **members}


def card_text(
    manifest: dict[str, Any], licenses: list[dict[str, Any]], quality: dict[str, Any], covered: int, preview: bool
) -> str:
    """``README.md``: the YAML front matter and the body."""
    front = yaml.safe_dump(metadata(manifest, licenses), sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n{body(manifest, licenses, quality, covered, preview)}"


def write_card(store: Store, manifest: dict[str, Any], licenses: list[dict[str, Any]] | None) -> None:
    """Writes ``preview.png`` (when the dataset has a sample) and ``README.md`` into ``store``, atomically,
    from ``manifest`` (not yet on disk: the writer calls this just before writing it). ``licenses``: the
    sources' ``SourceLicense.to_dict()``; None = unknown terms."""
    licenses = list(licenses or [])
    root = dataset_root(store.local_path() if store.local else store.url)
    refs = shard_refs(manifest, root, f"{store.display()}/{MANIFEST}")
    metas = [json.loads(s["json"]) for s in _samples(refs, False, QUALITY_SAMPLES)]
    quality = quantiles_of(metas)
    preview = bool(manifest["totals"].get("samples"))
    if preview:
        buf = io.BytesIO()
        contact_sheet(_samples(refs, True, PREVIEW_SAMPLES), PREVIEW_SAMPLES, 160, store.display()).save(buf, "PNG")
        store.write_bytes(PREVIEW, buf.getvalue())
    else:
        store.remove(PREVIEW)  # a re-run that now has no sample shows none
    store.write_bytes(CARD, card_text(manifest, licenses, quality, len(metas), preview).encode("utf-8"))


__all__ = ["CARD", "JSON_FIELDS", "PREVIEW", "card_text", "features", "metadata", "size_category", "write_card"]
