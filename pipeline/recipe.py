"""Curation recipes: keyword-only dataclasses loaded from YAML (``manifests/*.yaml``).

A recipe says *what* a dataset is (source, prompt, thresholds, filters, pairing, captions, shard
size, seed). ``executor`` says *how* it is run (batch sizes, actors) and is left out of
``recipe_hash``, as is ``source.root``: the source's identity is kept beside the hash instead
(``pipeline.inputs.source_identity`` in ``.progress/recipe.json`` and the manifest's
``dataset_id``), so a run from another root into a dataset directory is refused, and per-chunk
fingerprints over record fields and file stamps (``pipeline.inputs``) rebuild chunks whose
inputs changed.

Defaults are the production ("paper") settings. Test/demo settings live only in their recipes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from dynaip.configs import ConfigError, build, resolve_path, read_yaml
from dynaip.geometry import HOLE_FRAC, ISLAND_FRAC

SOURCE_KINDS = ("sa1b", "ffhq", "vitonhd", "opens2v", "anyinsertion", "folder", "subjects200k", "synth")
DIPTYCH_KINDS = ("subjects200k", "synth")
"""Readers whose records are diptychs (``records.Diptych``): only their recipes use ``consistency``."""


def reader_module(kind: str) -> Any:
    """``pipeline.sources.<kind>``, imported by kind so only the recipe's own reader loads (its heavy
    imports with it; docs/sources.md). ConfigError when the kind has no reader module."""
    try:
        return importlib.import_module(f"pipeline.sources.{kind}")
    except ModuleNotFoundError as e:
        if e.name == f"pipeline.sources.{kind}":
            raise ConfigError(f"source kind {kind!r} has no reader module pipeline/sources/{kind}.py yet") from None
        raise


def source_options_class(kind: str) -> type:
    """The ``Options`` dataclass of ``pipeline/sources/<kind>.py``: every option its reader accepts
    under ``source:`` besides ``kind`` and ``root``."""
    module = reader_module(kind)
    options = getattr(module, "Options", None)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"pipeline/sources/{kind}.py defines no Options dataclass listing its reader's options")
    return options


def source_options_mapping(options_cls: type, options: Any) -> dict[str, Any]:
    """The reader options of a ``source:`` section (a mapping, a ``SourceConfig`` or a dataclass),
    without ``kind``/``root`` and without nulls given for options that take no null: readers have
    always read such a null as "use the default" (``pipeline.sources.common.option``)."""
    if isinstance(options, SourceConfig):
        raw = dict(options.options)
    elif dataclasses.is_dataclass(options) and not isinstance(options, type):
        raw = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    elif isinstance(options, dict):
        raw = dict(options)
    else:
        raise ConfigError(f"source options must be a mapping, got {options!r}")
    raw.pop("kind", None)
    raw.pop("root", None)
    hints = typing.get_type_hints(options_cls)
    takes_null = {f.name: type(None) in typing.get_args(hints[f.name]) for f in dataclasses.fields(options_cls)}
    return {k: v for k, v in raw.items() if not ((v is None or v == "") and takes_null.get(k) is False)}


def check_source_options(kind: str, options: Any, where: str = "recipe") -> Any:
    """``options`` (the ``source:`` keys besides kind/root) checked against the reader's ``Options``
    and returned built; an unknown key fails in one line with the nearest valid name."""
    cls = source_options_class(kind)
    if isinstance(options, cls):
        return options
    return build(cls, source_options_mapping(cls, options), where=where, at="source.")


def has_word(text: str) -> bool:
    """False for a text holding no word: blank, or only Grounding DINO's ``.`` phrase separators."""
    return bool(text.replace(".", " ").strip())


@dataclass(kw_only=True)
class SourceConfig:
    """Where the inputs come from. Keys other than ``kind``/``root`` are reader options
    (read them with ``cfg.get(key, default)`` or as attributes)."""

    kind: str
    """Reader name: sa1b | ffhq | vitonhd | opens2v | anyinsertion | folder."""
    root: str = ""
    """Dataset root directory (``--source-root`` overrides it); a local root is kept resolved (absolute,
    symlinks followed), so every spelling of one folder is the same source."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reader-specific options (every other key under ``source:`` in the YAML)."""

    def get(self, key: str, default: Any = None) -> Any:
        if key in ("kind", "root"):
            return getattr(self, key)
        return self.options.get(key, default)

    def __getattr__(self, key: str) -> Any:  # reader options as attributes; missing → None
        if key.startswith("_") or key == "options":
            raise AttributeError(key)
        return self.__dict__.get("options", {}).get(key)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self.root, **self.options}


@dataclass(kw_only=True)
class DetectionConfig:
    """Grounding DINO settings."""

    prompt: str = "person . animal . object"
    """Detection caption when a record carries no ``phrase`` (phrases separated by ' . ')."""
    box_threshold: float = 0.35
    """Keep a query whose best token score exceeds this."""
    text_threshold: float = 0.25
    """A kept query must match its phrase's tokens at least this much."""
    image_size: int = 800
    """Shorter image side fed to the detector (pixels)."""
    max_size: int = 1333
    """Cap on the longer side fed to the detector (pixels)."""
    provided_boxes: Literal["use", "face", "ignore"] = "use"
    """What a record's ``boxes`` are: ``use`` = subject boxes (skip detection for such records),
    ``face`` = face boxes (detect the subject; use them for face crops), ``ignore``."""


@dataclass(kw_only=True)
class SegmentationConfig:
    """SAM settings and mask clean-up."""

    use_provided_masks: bool = True
    """Records with RLE ``masks`` use them instead of SAM."""
    island_frac: float = ISLAND_FRAC
    """Remove connected foreground parts smaller than this fraction of the mask's area."""
    hole_frac: float = HOLE_FRAC
    """Fill background holes smaller than this fraction of the mask's area."""
    box_margin: float | None = 0.1
    """SAM masks are cut to the prompt box grown by this fraction of its longer side (leaks past
    the detected subject are background); None keeps SAM's mask as is."""


@dataclass(kw_only=True)
class FilterConfig:
    """Input validation and subject filters; each rejection names its reason."""

    min_image_side: int = 256
    """Reject images whose shorter side is below this (pixels)."""
    max_image_pixels: int = 89_478_485
    """Reject images (and video frames) whose *declared* W*H exceeds this before decoding
    (decompression-bomb guard)."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Reject an image file (or tar member) larger than this, checked from its size (stat, tar
    header, object info) before any byte is read: a 1 GiB ".jpg" never reaches memory."""
    min_box_area: float = 0.02
    """Reject when the primary box covers less than this fraction of the image."""
    max_box_area: float = 0.95
    """Reject when the primary box covers more than this fraction of the image."""
    max_comparable_subjects: int = 1
    """Reject when more than this many distinct subjects score close to the primary one."""
    comparable_score_ratio: float = 0.8
    """A detection is 'comparable' when its score >= ratio * primary score."""
    same_subject_iou: float = 0.5
    """Detections overlapping the primary box more than this IoU count as the same subject."""
    max_mask_components: int = 3
    """Reject masks that stay in more than this many parts after clean-up."""
    min_largest_component: float = 0.8
    """Reject masks whose largest part holds less than this fraction of the mask."""
    min_mask_area: float = 1 / 32
    """Reject masks covering less than this fraction of the image (OpenS2V uses 1/32)."""
    min_reference_side: int = 112
    """Reject when the composed reference's shorter side is below this (pixels): a 40 × 40 face crop
    is no training reference for a 336-pixel image encoder. 0 = no limit."""
    # Quality thresholds (docs/curation_quality.md): each reads one value of the sample's ``quality``
    # json; None (the default: the paper states no value) keeps every sample and only records it.
    min_aesthetic: float | None = None
    """Reject when ``quality.aesthetic`` (aesthetic head on the target; needs ``aesthetic`` in models.yaml) is below this."""
    min_sharpness: float | None = None
    """Reject when ``quality.sharpness`` (variance of the Laplacian over the reference's subject, grayscale 0-255) is below this."""
    min_subject_pixels: int | None = None
    """Reject when ``quality.subject_pixels`` (subject mask pixels inside the reference) is below this."""
    min_mask_score: float | None = None
    """Reject when ``quality.mask_score`` (SAM's predicted IoU; absent for source-given masks) is below this."""


@dataclass(kw_only=True)
class HumanConfig:
    """People get a face or a whole-body reference, chosen per record with seeded odds."""

    phrases: list[str] = field(
        default_factory=lambda: ["person", "man", "woman", "boy", "girl", "child", "people", "human", "lady", "face"]
    )
    """Primary phrases that count as a person."""
    face_prob: float = 0.5
    """Probability of a face reference (else whole body)."""
    face_prompt: str = "face"
    """Detection phrase for the face when the record provides no face box."""
    face_margin: float = 0.25
    """Face crop grows by this fraction of the face box side on each side."""


@dataclass(kw_only=True)
class ReferenceConfig:
    """How the white-background reference is composed."""

    margin: float = 0.05
    """Crop margin around the mask's box, as a fraction of the box's longer side."""


@dataclass(kw_only=True)
class PairingConfig:
    """Which pair kinds are built. A record is cross when it carries a ``reference``, else intra."""

    kinds: list[Literal["intra", "cross"]] = field(default_factory=lambda: ["intra", "cross"])
    """Allowed pair kinds; records of another kind are rejected with a reason."""


@dataclass(kw_only=True)
class CaptionConfig:
    """Captions: provided → model → template, first that applies."""

    order: list[Literal["provided", "model", "template"]] = field(
        default_factory=lambda: ["provided", "model", "template"]
    )
    """Caption sources tried in this order."""
    model: str | None = None
    """Local transformers image-to-text directory (e.g. a BLIP checkpoint); None = models.yaml's
    ``captioner``, and 'model' is skipped when neither is given."""
    template: str = "a photo of a {phrase}"
    """Template caption; ``{phrase}`` is the subject phrase."""
    max_new_tokens: int = 40
    """Generation length for the captioning model (greedy decoding stops here at the latest)."""
    prompt: str | None = None
    """Text the captioning model continues (BLIP conditional captioning, e.g. "a photo of"); None =
    unconditional captions (BLIP's default). Recorded in the sample json as ``caption_prompt``."""


@dataclass(kw_only=True)
class ConsistencyConfig:
    """Diptych pairs (``records.Diptych``): are the two panels the same subject? The score is the cosine
    of the OpenCLIP image embeddings (models.yaml ``clip_vision``) of the two cut-outs, each padded to a
    white square; it is recorded in the sample json (``diptych.consistency``). Other records skip it."""

    min_score: float | None = 0.75
    """Reject a diptych whose cut-outs' cosine is below this (stage 'consistency'); null records the score
    only. 0.75 is this project's choice for ViT-L/14 (no published value): cut-outs of one object in two
    scenes score above it, different objects of one category mostly below."""


THUMB_DIFF_DEFAULT = 10.0

# Bounds of numeric recipe values beyond which a value means nothing physically (Recipe.validate says the range)
MAX_MARGIN = 2.0
"""Crop margins are fractions of a box side: past 2 the "crop" is mostly background."""
MAX_DETECTOR_SIDE = 4096
"""Detector input sides, in pixels (Grounding DINO was trained at 800 / 1333)."""
DETECTOR_QUERIES = 900
"""Boxes Grounding DINO returns at most (its query count)."""
MAX_SIDE = 65535
"""Image sides in pixels (JPEG's largest)."""
MAX_COUNT = 1_000_000
"""Counts (inputs per shard, mask parts)."""
MAX_BATCH = 4096
"""Images per model batch."""
MAX_CAPTION_TOKENS = 512
"""Caption length in tokens (BLIP's text model holds 512 positions)."""


@dataclass(kw_only=True)
class DedupConfig:
    """Dataset-wide near-duplicate removal, after every chunk is built (across chunks and sources)."""

    max_distance: int | None = 12
    """Two accepted inputs of one pair kind are near-duplicates when the perceptual hashes of their
    targets (and, for cross pairs, of their reference images) differ in at most this many bits; the
    one later in input order is rejected as ``duplicate of <key>``. null turns de-duplication off.
    With 256-bit hashes, re-encoded or resized copies of the sample photos stay within 4 bits, while
    the closest distinct photos (the two stereo views of one motorcycle) differ in 76."""
    hash_size: int = 16
    """pHash side (imagehash): hashes of hash_size² bits."""
    max_thumb_diff: float | None = THUMB_DIFF_DEFAULT
    """The second check before a near copy is rejected: no value of the 8×8 RGB thumbnails of the two
    inputs' images (box averages, 0–255, stored in the ledger) may differ by more than this. pHash
    alone calls about 5 % of distinct low-detail objects on white near copies; with this check 0.04 %
    are, while 99 % of resized + re-encoded copies stay within 10 (BENCHMARKS.md, "Ten-million
    scale"). null: pHash only."""


@dataclass(kw_only=True)
class DecontaminationConfig:
    """Inputs that copy a benchmark image are rejected (stage ``decontamination``), so numbers reported on
    that benchmark are not measured on training data (docs/decontamination.md). Off while ``against`` is
    empty."""

    against: list[str] = field(default_factory=list)
    """Benchmark roots: DreamBench++ as published, a DynaIP-Bench subject pool, or any folder of images
    (every image file under the root is a benchmark image). A relative path resolves against the recipe's
    folder. Each root's content (not its path) is part of every chunk's fingerprint, so a run resumed
    against other benchmarks rebuilds its chunks."""
    max_distance: int | None = 12
    """A target or reference whose pHash is within this many bits of a benchmark image's (and whose 8×8
    thumbnail is within ``max_thumb_diff``) is a copy of it: resized and re-encoded copies stay within
    4 bits of 256 (``dedup.max_distance``, BENCHMARKS.md). null: no pHash check."""
    hash_size: int = 16
    """pHash side (hashes of hash_size² bits)."""
    max_thumb_diff: float | None = THUMB_DIFF_DEFAULT
    """The pHash match's second check (as ``dedup.max_thumb_diff``); null: pHash only."""
    min_similarity: float | None = 0.95
    """A target or reference whose OpenCLIP image embedding (models.yaml ``clip_vision``) has at least this
    cosine with a benchmark image's is a crop or light edit of it. 0.95 is this project's choice (no
    published value; not measured on real weights here); null: no embedding check (and no model needed)."""


@dataclass(kw_only=True)
class ShardConfig:
    """Shard layout. Shards follow input order: every ``inputs_per_shard`` inputs form one chunk,
    chunk i → ``shards/{i:06d}.tar`` (split into ``{i:06d}_{p:02d}.tar`` parts past ``max_bytes``)."""

    inputs_per_shard: int = 1000
    """Reader records per chunk (one shard per chunk); independent of batch sizes."""
    max_bytes: int | None = 1_000_000_000
    """Start a new part once a shard reaches this many bytes; None = never split."""
    jpeg_quality: int = 95
    """JPEG quality of tgt.jpg."""


@dataclass(kw_only=True)
class ExecutorConfig:
    """How the stages run (not part of ``recipe_hash``)."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        key: "is gone: every stage (detection and segmentation included) runs inside the chunk workers; "
        "size them with executor.workers, cpus_per_worker and gpus_per_actor"
        for key in ("detect_actors", "segment_actors")
    }

    batch_size: int = 8
    """Records per model batch (detection and segmentation); batches never span chunks."""
    device: str = "auto"
    """Torch device for models: auto | cpu | cuda | cuda:N."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Numeric precision of Grounding DINO and SAM: auto = bf16 on a CUDA device that supports it, else
    fp32. Under bf16/fp16 the models run under autocast with TF32 allowed; box decoding, mask upsampling,
    thresholds and every keep/reject decision stay fp32. The resolved precision is part of the output
    directory's identity: a resume at another precision is refused (docs/curation_speed.md)."""
    prefetch: int = 1
    """Batches whose inputs (reading, decoding) are prepared on a CPU thread while the models run on the
    current one; 0 = none. Output bytes do not depend on it."""
    workers: int | None = None
    """Ray: chunk workers (actors that each hold every stage and its models, build whole chunks and
    write their shards); None = as many as the cluster's resources fit."""
    cpus_per_worker: float = 1.0
    """Ray: CPUs each worker reserves; its torch uses as many threads."""
    gpus_per_actor: float = 1.0
    """Ray: GPUs per worker when the cluster has GPUs (ignored on a CPU-only cluster)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Ray: custom resources each worker needs, e.g. ``{curate: 1}`` to place the workers (and so
    the models) on nodes started with ``ray start --resources='{"curate": N}'``."""


@dataclass(kw_only=True)
class Recipe:
    """A curation recipe (see ``manifests/``)."""

    source: SourceConfig
    """The input dataset."""
    name: str = ""
    """Human-readable recipe name."""
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    """Grounding DINO prompt and thresholds."""
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    """SAM and mask clean-up."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Validation and subject filters."""
    human: HumanConfig = field(default_factory=HumanConfig)
    """Face / whole-body references for people."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Reference composition."""
    pairing: PairingConfig = field(default_factory=PairingConfig)
    """Pair kinds."""
    captioning: CaptionConfig = field(default_factory=CaptionConfig)
    """Caption sources."""
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    """Subject consistency of diptych pairs."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Dataset-wide near-duplicate removal."""
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    """Inputs copying a benchmark image are rejected (off by default)."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Shard layout."""
    seed: int = 0
    """Seed of every random choice (per record: seed + record key)."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Execution settings (not hashed)."""

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, source_root: str | None = None) -> "Recipe":
        path = Path(path)
        raw = read_yaml(path, "recipe", "pass an existing YAML (see manifests/)")
        return cls.from_dict(raw, source_root=source_root, base=path.parent, where=f"recipe '{path}'")

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source_root: str | None = None, base: str | Path | None = None, where: str = "recipe"
    ) -> "Recipe":
        """The recipe of the mapping ``raw`` (``where`` names it in messages). Every key is checked:
        sections against their dataclasses, ``source:`` options against the reader's ``Options``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping at the top level, got {type(raw).__name__}")
        raw = dict(raw)
        src = raw.pop("source", None)
        if not isinstance(src, dict) or "kind" not in src:
            raise ConfigError(
                f"{where}: recipe field 'source' must be a mapping with 'kind' (one of "
                f"{', '.join(SOURCE_KINDS)}) and 'root', e.g. source: {{kind: folder, root: photos/}}"
            )
        src = dict(src)
        kind, root = src.pop("kind"), src.pop("root", "")
        if kind not in SOURCE_KINDS:
            raise ConfigError(f"{where}: recipe field 'source.kind' is {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
        if source_root is not None:
            root = str(source_root)
        elif root and base is not None:
            root = resolve_path(str(root), base)
        if root and "://" not in str(root):  # one spelling of a local root (``../photos`` = its absolute path)
            root = os.path.realpath(os.path.expanduser(str(root)))
        check_source_options(kind, src, where)
        dc = raw.get("decontamination")
        if isinstance(dc, dict) and isinstance(dc.get("against"), list) and base is not None:
            raw["decontamination"] = {
                **dc,
                "against": [resolve_path(a, base) if isinstance(a, str) and a.strip() else a for a in dc["against"]],
            }
        source = SourceConfig(kind=kind, root=str(root or ""), options=src)
        if "source" in {f.name for f in dataclasses.fields(cls)}:
            raw["source"] = source
        recipe = build(cls, raw, where=where)
        try:
            recipe.validate()
        except ValueError as e:
            raise ConfigError(str(e) if where == "recipe" else f"{where}: {e}") from None
        return recipe

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["source"] = self.source.to_dict()
        return d

    def validate(self) -> None:
        """Range checks; raises ValueError naming the field."""

        def need(ok: bool, name: str, value: Any, why: str) -> None:
            if not ok:
                raise ValueError(f"recipe field '{name}' = {value!r}: {why}")

        d, f, s = self.detection, self.filters, self.segmentation
        for name, v in (
            ("detection.box_threshold", d.box_threshold),
            ("detection.text_threshold", d.text_threshold),
            ("segmentation.island_frac", s.island_frac),
            ("segmentation.hole_frac", s.hole_frac),
            ("filters.min_box_area", f.min_box_area),
            ("filters.max_box_area", f.max_box_area),
            ("filters.comparable_score_ratio", f.comparable_score_ratio),
            ("filters.same_subject_iou", f.same_subject_iou),
            ("filters.min_largest_component", f.min_largest_component),
            ("filters.min_mask_area", f.min_mask_area),
            ("human.face_prob", self.human.face_prob),
        ):
            need(0.0 <= v <= 1.0, name, v, "must be in [0, 1]")
        need(
            f.min_box_area < f.max_box_area,
            "filters.min_box_area",
            f.min_box_area,
            "must be below filters.max_box_area",
        )
        need(
            32 <= d.image_size <= MAX_DETECTOR_SIDE,
            "detection.image_size",
            d.image_size,
            f"must be in 32..{MAX_DETECTOR_SIDE} pixels (Grounding DINO's own: 800)",
        )
        need(
            d.image_size <= d.max_size <= MAX_DETECTOR_SIDE,
            "detection.max_size",
            d.max_size,
            f"must be in detection.image_size..{MAX_DETECTOR_SIDE} pixels (Grounding DINO's own: 1333)",
        )
        # semantically empty texts: such a run would reject every input and write an empty dataset
        need(
            has_word(d.prompt),
            "detection.prompt",
            d.prompt,
            "names no phrase; give phrases separated by ' . ', e.g. 'person . animal . object'",
        )
        need(
            has_word(self.human.face_prompt), "human.face_prompt", self.human.face_prompt, "names nothing; e.g. 'face'"
        )
        need(
            bool(self.human.phrases),
            "human.phrases",
            self.human.phrases,
            "is empty; name the phrases that mean a person (set human.face_prob: 0 for no face references)",
        )
        for i, phrase in enumerate(self.human.phrases):
            need(has_word(phrase), f"human.phrases[{i}]", phrase, "names nothing; give a word or drop the entry")
        need(
            "template" not in self.captioning.order or has_word(self.captioning.template),
            "captioning.template",
            self.captioning.template,
            "is blank; e.g. 'a photo of a {phrase}' (or drop 'template' from captioning.order)",
        )
        need(
            d.provided_boxes in ("use", "face", "ignore"),
            "detection.provided_boxes",
            d.provided_boxes,
            "use one of use | face | ignore",
        )
        need(
            1 <= f.max_comparable_subjects <= DETECTOR_QUERIES,
            "filters.max_comparable_subjects",
            f.max_comparable_subjects,
            f"must be in 1..{DETECTOR_QUERIES} (Grounding DINO returns at most {DETECTOR_QUERIES} boxes)",
        )
        need(
            1 <= f.max_mask_components <= MAX_COUNT,
            "filters.max_mask_components",
            f.max_mask_components,
            f"must be in 1..{MAX_COUNT}",
        )
        need(
            1 <= f.min_image_side <= MAX_SIDE,
            "filters.min_image_side",
            f.min_image_side,
            f"must be in 1..{MAX_SIDE} pixels",
        )
        need(
            1 <= f.max_image_pixels <= MAX_SIDE**2,
            "filters.max_image_pixels",
            f.max_image_pixels,
            f"must be in 1..{MAX_SIDE**2}",
        )
        need(
            f.min_image_side**2 <= f.max_image_pixels,
            "filters.min_image_side",
            f.min_image_side,
            "squared exceeds filters.max_image_pixels: no image could pass both; lower one of them",
        )
        need(f.max_file_bytes >= 1, "filters.max_file_bytes", f.max_file_bytes, "must be >= 1")
        need(
            s.box_margin is None or 0 <= s.box_margin <= MAX_MARGIN,
            "segmentation.box_margin",
            s.box_margin,
            f"must be in [0, {MAX_MARGIN}] (a fraction of the box's longer side) or null",
        )
        need(
            0 <= self.reference.margin <= MAX_MARGIN,
            "reference.margin",
            self.reference.margin,
            f"must be in [0, {MAX_MARGIN}] (a fraction of the subject box's longer side; paper: 0.05)",
        )
        need(
            0 <= self.human.face_margin <= MAX_MARGIN,
            "human.face_margin",
            self.human.face_margin,
            f"must be in [0, {MAX_MARGIN}] (a fraction of the face box's side)",
        )
        need(
            bool(self.pairing.kinds) and set(self.pairing.kinds) <= {"intra", "cross"},
            "pairing.kinds",
            self.pairing.kinds,
            "give a non-empty subset of [intra, cross]",
        )
        need(
            bool(self.captioning.order) and set(self.captioning.order) <= {"provided", "model", "template"},
            "captioning.order",
            self.captioning.order,
            "give a non-empty subset of [provided, model, template]",
        )
        need(
            1 <= self.shards.inputs_per_shard <= MAX_COUNT,
            "shards.inputs_per_shard",
            self.shards.inputs_per_shard,
            f"must be in 1..{MAX_COUNT}",
        )
        need(
            self.shards.max_bytes is None or self.shards.max_bytes > 0,
            "shards.max_bytes",
            self.shards.max_bytes,
            "must be > 0 or null",
        )
        need(1 <= self.shards.jpeg_quality <= 100, "shards.jpeg_quality", self.shards.jpeg_quality, "must be in 1..100")
        need(
            1 <= self.executor.batch_size <= MAX_BATCH,
            "executor.batch_size",
            self.executor.batch_size,
            f"must be in 1..{MAX_BATCH}",
        )
        need(
            self.executor.precision in ("auto", "bf16", "fp16", "fp32"),
            "executor.precision",
            self.executor.precision,
            "use one of auto | bf16 | fp16 | fp32",
        )
        need(
            0 <= self.executor.prefetch <= MAX_BATCH,
            "executor.prefetch",
            self.executor.prefetch,
            f"must be in 0..{MAX_BATCH} batches",
        )
        need(
            0 <= f.min_reference_side <= MAX_SIDE,
            "filters.min_reference_side",
            f.min_reference_side,
            f"must be in 0..{MAX_SIDE} pixels",
        )
        need(
            f.min_sharpness is None or f.min_sharpness >= 0,
            "filters.min_sharpness",
            f.min_sharpness,
            "must be >= 0 or null",
        )
        need(
            f.min_subject_pixels is None or f.min_subject_pixels >= 0,
            "filters.min_subject_pixels",
            f.min_subject_pixels,
            "must be >= 0 or null",
        )
        need(
            f.min_mask_score is None or 0.0 <= f.min_mask_score <= 1.0,
            "filters.min_mask_score",
            f.min_mask_score,
            "must be in [0, 1] or null",
        )
        cs = self.consistency.min_score
        need(cs is None or -1.0 <= cs <= 1.0, "consistency.min_score", cs, "must be in [-1, 1] or null")
        need(
            1 <= self.captioning.max_new_tokens <= MAX_CAPTION_TOKENS,
            "captioning.max_new_tokens",
            self.captioning.max_new_tokens,
            f"must be in 1..{MAX_CAPTION_TOKENS} (BLIP's text positions)",
        )
        dd = self.dedup
        need(
            dd.max_distance is None or 0 <= dd.max_distance < dd.hash_size**2,
            "dedup.max_distance",
            dd.max_distance,
            "must be null or in [0, hash_size²)",
        )
        need(2 <= dd.hash_size <= 32, "dedup.hash_size", dd.hash_size, "must be in 2..32")
        need(
            dd.max_thumb_diff is None or 0 <= dd.max_thumb_diff <= 255,
            "dedup.max_thumb_diff",
            dd.max_thumb_diff,
            "must be null or in [0, 255]",
        )
        dc = self.decontamination
        for i, a in enumerate(dc.against):
            need(
                isinstance(a, str) and bool(a.strip()) and "://" not in a,
                f"decontamination.against[{i}]",
                a,
                "give a local folder: the root of a benchmark",
            )
        need(
            dc.max_distance is None or 0 <= dc.max_distance < dc.hash_size**2,
            "decontamination.max_distance",
            dc.max_distance,
            "must be null or in [0, hash_size²)",
        )
        need(2 <= dc.hash_size <= 32, "decontamination.hash_size", dc.hash_size, "must be in 2..32")
        need(
            dc.max_thumb_diff is None or 0 <= dc.max_thumb_diff <= 255,
            "decontamination.max_thumb_diff",
            dc.max_thumb_diff,
            "must be null or in [0, 255]",
        )
        need(
            dc.min_similarity is None or -1.0 <= dc.min_similarity <= 1.0,
            "decontamination.min_similarity",
            dc.min_similarity,
            "must be null or in [-1, 1]",
        )
        need(
            not dc.against or dc.max_distance is not None or dc.min_similarity is not None,
            "decontamination.max_distance",
            dc.max_distance,
            "and min_similarity are both null: nothing would be checked; set one (or empty decontamination.against)",
        )
        ex = self.executor
        need(ex.workers is None or ex.workers >= 1, "executor.workers", ex.workers, "must be >= 1 or null")
        need(ex.cpus_per_worker > 0, "executor.cpus_per_worker", ex.cpus_per_worker, "must be > 0")
        need(ex.gpus_per_actor >= 0, "executor.gpus_per_actor", ex.gpus_per_actor, "must be >= 0")
        need(
            all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in ex.resources.items()
            ),
            "executor.resources",
            ex.resources,
            "give a mapping of resource name to a positive number",
        )

    @property
    def recipe_hash(self) -> str:
        """16 hex digits of sha256 over the canonical recipe, without ``executor`` and ``source.root`` (and
        without ``consistency`` for sources that yield no diptychs, ``decontamination`` when it is off, and
        the benchmark paths of ``decontamination.against``: only how many there are)."""
        d = self.to_dict()
        d.pop("executor")
        d["source"].pop("root")
        if self.source.kind not in DIPTYCH_KINDS:  # no effect on other sources: their hashes stay what they were
            d.pop("consistency")
        if not self.decontamination.against:  # off: hashes stay what they were before the section existed
            d.pop("decontamination")
        else:  # where the benchmarks lie is no part of the dataset; their content enters every chunk's fingerprint
            d["decontamination"]["against"] = len(self.decontamination.against)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
