"""Stage 2 — Grounding DINO detection (batched), plus the face box for face-crop references.

Views whose candidates the source already gives (provided boxes with ``detection.provided_boxes:
use``, provided RLE masks, cross-pair reference masks/boxes) skip detection. The caption is the
record's ``phrase`` or else ``detection.prompt``. For people, the per-record seeded crop mode is
drawn here; face mode needs a face box: the record's provided face box (``provided_boxes: face``,
e.g. FFHQ ``face_rect``) or the best ``human.face_prompt`` detection whose centre lies in the
subject's box. No face found → whole body (``face_fallback`` in the sample json).
"""

from __future__ import annotations

from typing import Any


from pipeline.recipe import Recipe
from pipeline.sample import Candidate, Item, View
from pipeline.stages.common import LazyModel, SetupError, is_human, record_rng, resolve_device
from pipeline.stages.select import rank_candidates


class DetectStage(LazyModel):
    """``__call__(items) -> items``. Constructible from (recipe, models config); picklable."""

    name = "detect"
    _model_attrs = ("_detector",)

    def __init__(self, recipe: Recipe, models: Any, detector: Any = None):
        self.recipe = recipe
        self.models = models
        self._detector = detector

    @property
    def detector(self):
        """``GroundingDinoDetector`` built from ``models.grounding_dino`` on first use."""
        if self._detector is None:
            from dynaip.models.grounding_dino import GroundingDinoDetector, load_grounding_dino

            device = resolve_device(self.recipe.executor.device)
            if self.models is None:
                raise SetupError("detection is needed but no models config was given; pass --models M.yaml")
            try:
                model = load_grounding_dino(self.models.require("grounding_dino"), device=device)
            except Exception as e:
                raise SetupError(f"cannot load Grounding DINO: {e}") from e
            d = self.recipe.detection
            self._detector = GroundingDinoDetector(
                model, size=d.image_size, max_size=d.max_size, device=device, precision=self.recipe.executor.precision
            )
        return self._detector

    def _detect(self, jobs: list[tuple[Item, View, str]]) -> list[list[Candidate] | None]:
        """Runs ``jobs`` (item, view, caption) in batches; a failing batch is retried one by one
        so one bad image only rejects itself."""
        d = self.recipe.detection
        out: list[list[Candidate] | None] = []
        bs = self.recipe.executor.batch_size
        detector = self.detector  # loads once; a setup failure stops the job
        for i in range(0, len(jobs), bs):
            part = jobs[i : i + bs]
            try:
                dets = detector.detect(
                    [v.image for _, v, _ in part],
                    [c for _, _, c in part],
                    box_threshold=d.box_threshold,
                    text_threshold=d.text_threshold,
                )
            except Exception:
                if len(part) == 1:
                    raise
                dets = []
                for job in part:
                    try:
                        dets.append(
                            detector.detect(
                                [job[1].image], [job[2]], box_threshold=d.box_threshold, text_threshold=d.text_threshold
                            )[0]
                        )
                    except Exception as e:
                        job[0].fail(self.name, f"detector failed on this image ({type(e).__name__}: {e})")
                        dets.append(None)
            for ds in dets:
                out.append(None if ds is None else [Candidate(tuple(x.box), float(x.score), x.phrase) for x in ds])
        return out

    def __call__(self, items: list[Item]) -> list[Item]:
        jobs = [
            (it, v, it.record.phrase or self.recipe.detection.prompt)
            for it in items
            if it.ok
            for v in it.views()
            if not v.searched
        ]
        for (item, view, _), cands in zip(jobs, self._detect(jobs) if jobs else []):
            if cands is not None:
                view.candidates = cands
                view.searched = True
        self._faces([it for it in items if it.ok])
        return items

    def _faces(self, items: list[Item]) -> None:
        h = self.recipe.human
        need: list[tuple[Item, View, Candidate]] = []
        for item in items:
            if item.record.diptych is not None:  # both panels give whole-subject cut-outs (compared by consistency)
                continue
            view = item.ref_view
            ranked = rank_candidates(view.candidates)
            if not ranked or not is_human(ranked[0].phrase, h.phrases):
                continue
            if record_rng(self.recipe.seed, item.record, "crop").random() >= h.face_prob:
                continue
            item.crop_mode = "face"
            if view.face_box is None:
                need.append((item, view, ranked[0]))
        if not need:
            return
        results = self._detect([(it, v, h.face_prompt) for it, v, _ in need])
        for (item, view, subject), faces in zip(need, results):
            if not item.ok:
                continue
            x0, y0, x1, y1 = subject.box
            inside = [
                f
                for f in faces or []
                if x0 <= (f.box[0] + f.box[2]) / 2 <= x1 and y0 <= (f.box[1] + f.box[3]) / 2 <= y1
            ]
            if inside:
                view.face_box = max(inside, key=lambda f: f.score).box
            else:
                item.crop_mode = "body"
                item.face_fallback = True
