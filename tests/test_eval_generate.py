"""Generation: preset masks, the one pipeline call, and resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaip.eval.cases import Case, Subject
from dynaip.eval.generate import GenerateSettings, generate_case, image_path, is_done, preset_masks, run_generation


def _cases(tmp_path: Path, n: int) -> list[Case]:
    ref = tmp_path / "ref.png"
    Image.new("RGB", (20, 30), (10, 200, 30)).save(ref)
    return [
        Case(
            id=f"c{i:02d}",
            benchmark="dreambench++",
            category="animal",
            prompt=f"prompt {i}",
            seed=100 + i,
            subjects=[Subject(path=str(ref), type="animal", name="a dog")],
        )
        for i in range(n)
    ]


def _band(mask: Image.Image) -> tuple[int, int]:
    cols = np.flatnonzero(np.asarray(mask)[0] == 255)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert (np.asarray(mask) == np.asarray(mask)[:1]).all()  # full-height band
    return int(cols[0]), int(cols[-1]) + 1


def test_preset_masks_bands():
    assert [_band(m) for m in preset_masks(["left", "right"], 64, 32)] == [(0, 32), (32, 64)]
    assert [_band(m) for m in preset_masks(["left", "middle", "right"], 60, 16)] == [(0, 20), (20, 40), (40, 60)]
    assert [_band(m) for m in preset_masks(["middle", "middle", "middle"], 60, 16)] == [(10, 50)] * 3
    assert [_band(m) for m in preset_masks(["right", "left"], 64, 16)] == [(32, 64), (0, 32)]
    assert preset_masks(["left"], 40, 24)[0].size == (40, 24)
    with pytest.raises(ValueError, match="'top'.*left / middle / right"):
        preset_masks(["top", "left"], 64, 64)


class RecordingPipe:
    """Stands in for DynaIPFluxPipeline: records the call and returns a flat image."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(
        self,
        *,
        prompt,
        references,
        masks,
        scale,
        granularity,
        seed,
        num_inference_steps,
        height,
        width,
        guidance_scale,
        auto_mask=None,
    ):
        self.calls.append(
            dict(
                prompt=prompt,
                references=references,
                masks=masks,
                scale=scale,
                granularity=granularity,
                seed=seed,
                steps=num_inference_steps,
                size=(width, height),
                guidance=guidance_scale,
                auto_mask=auto_mask,
            )
        )
        return Image.new("RGB", (width, height), (seed % 256, 0, 0))


def test_generate_case_calls_pipeline_with_masks(tmp_path):
    single = _cases(tmp_path, 1)[0]
    settings = GenerateSettings(steps=3, height=32, width=48, guidance=2.0, scale=0.8, granularity=(1, 0, 0))
    pipe = RecordingPipe()
    img = generate_case(pipe, single, settings)
    call = pipe.calls[0]
    assert img.size == (48, 32)
    assert (call["prompt"], call["seed"], call["steps"], call["guidance"], call["scale"], call["granularity"]) == (
        "prompt 0",
        100,
        3,
        2.0,
        0.8,
        [1.0, 0.0, 0.0],
    )
    assert call["masks"] is None and call["references"][0].mode == "RGB" and call["references"][0].size == (20, 30)

    ref = single.subjects[0]
    multi = Case(
        id="m",
        benchmark="dynaip-bench",
        category="human+object",
        prompt="p",
        seed=5,
        subjects=[ref, Subject(path=ref.path, type="object", name="a cup")],
        layout=["left", "right"],
    )
    generate_case(pipe, multi, settings)
    masks = pipe.calls[1]["masks"]
    assert [m.size for m in masks] == [(48, 32)] * 2 and [_band(m) for m in masks] == [(0, 24), (24, 48)]
    assert pipe.calls[1]["auto_mask"] is None

    auto = GenerateSettings(steps=3, height=32, width=48, auto_mask=True)
    generate_case(pipe, multi, auto)
    assert pipe.calls[2]["masks"] is None and pipe.calls[2]["auto_mask"] == ["a dog", "a cup"]

    def no_auto(
        *, prompt, references, masks, scale, granularity, seed, num_inference_steps, height, width, guidance_scale
    ):
        raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="takes no auto_mask argument"):
        generate_case(no_auto, multi, auto)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="height=1000 must be a positive multiple of 16"):
        GenerateSettings(height=1000)
    with pytest.raises(ValueError, match="three weights"):
        GenerateSettings(granularity=(1, 0))


class Interrupted(RuntimeError):
    pass


def test_resume_after_interruption_skips_finished_cases(tmp_path):
    cases = _cases(tmp_path, 10)
    out = tmp_path / "gen"
    settings = GenerateSettings(steps=1, height=16, width=16)
    calls: list[str] = []
    factory_calls: list[int] = []

    def factory():
        factory_calls.append(1)
        return "pipe"

    def fake(pipe, case, s):
        assert pipe == "pipe" and s == settings
        if len(calls) == 6 and not (out / "interrupted-once").exists():
            (out / "interrupted-once").touch()
            raise Interrupted("preempted")
        calls.append(case.id)
        return Image.new("RGB", (s.width, s.height), (case.seed, 0, 0))

    with pytest.raises(Interrupted):
        run_generation(cases, out, settings=settings, pipe_factory=factory, generate_fn=fake)
    assert calls == [f"c{i:02d}" for i in range(6)]
    assert [is_done(out, c.id) for c in cases] == [True] * 6 + [False] * 4
    assert not list((out / "images").glob(".*tmp"))  # no half-written files

    summary = run_generation(cases, out, settings=settings, pipe_factory=factory, generate_fn=fake)
    assert (summary.total, summary.skipped, summary.generated) == (10, 6, 4)
    assert calls == [f"c{i:02d}" for i in range(10)]  # nothing generated twice
    side = json.loads(image_path(out, "c07").with_suffix(".json").read_text())
    assert (side["case_id"], side["seed"], side["settings"]["width"]) == ("c07", 107, 16)
    assert Image.open(image_path(out, "c07")).getpixel((0, 0)) == (107, 0, 0)

    # a PNG without its sidecar (crash between the two writes) is not finished: it is redone
    image_path(out, "c03").with_suffix(".json").unlink()
    summary = run_generation(cases, out, settings=settings, pipe_factory=factory, generate_fn=fake)
    assert (summary.skipped, summary.generated) == (9, 1) and calls[-1] == "c03" and len(calls) == 11

    n_factory = len(factory_calls)
    summary = run_generation(cases, out, settings=settings, pipe_factory=factory, generate_fn=fake)
    assert summary.generated == 0 and len(factory_calls) == n_factory  # nothing left: no pipeline built

    with pytest.raises(ValueError, match=r"other settings.*'steps': \(1, 2\).*new --out"):
        run_generation(
            cases, out, settings=GenerateSettings(steps=2, height=16, width=16), pipe_factory=factory, generate_fn=fake
        )


def test_real_pipeline_generates_single_and_multi_cases(tmp_path, tiny_models_yaml):
    """The production path: DynaIPFluxPipeline from the tiny checkpoints, preset masks for a two-subject case."""
    from dynaip.adapter import DynaIPAdapter, DynaIPConfig
    from dynaip.eval.generate import real_pipe_factory

    DynaIPAdapter(DynaIPConfig.tiny()).save_pretrained(tmp_path / "adapter")
    single = _cases(tmp_path, 1)[0]
    ref = single.subjects[0]
    multi = Case(
        id="m0",
        benchmark="dynaip-bench",
        category="human+object",
        prompt="a man and a cup",
        seed=3,
        subjects=[ref, Subject(path=ref.path, type="object", name="a cup")],
        layout=["left", "right"],
    )
    settings = GenerateSettings(steps=1, height=32, width=48)
    summary = run_generation(
        [single, multi],
        tmp_path / "gen",
        settings=settings,
        pipe_factory=real_pipe_factory(str(tiny_models_yaml), str(tmp_path / "adapter"), "cpu"),
    )
    assert summary.generated == 2
    assert [Image.open(image_path(tmp_path / "gen", c.id)).size for c in (single, multi)] == [(48, 32)] * 2
