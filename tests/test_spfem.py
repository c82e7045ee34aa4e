"""The SPFEM study's pieces: the renderer, the measurements, a tiny run."""

import json

import pytest
import torch

from stccl.experiments import faces, spfem


def test_renderer_is_deterministic_and_in_range():
    def clips(seed):
        return spfem.make_clips(3, spfem.Settings(frames=5), seed)

    a, b, c = clips(7), clips(7), clips(8)
    assert a.clips.shape == (3, 5, 3, 48, 48)
    assert torch.equal(a.clips, b.clips) and torch.equal(a.openings, b.openings)
    assert not torch.equal(a.clips, c.clips)
    assert a.clips.min() >= 0 and a.clips.max() <= 1
    assert (a.targets != a.emotions).all()


def test_speech_is_smooth_and_in_range():
    openings = faces.speech(64, 16, torch.Generator().manual_seed(0))
    lo, hi = faces.OPENING_RANGE
    assert openings.min() >= lo - 1e-6 and openings.max() <= hi + 1e-6
    # periods of 3 frames or more: one frame moves at most 2 pi / 3 of a cycle
    assert (openings.diff(dim=1).abs() <= (hi - lo) * 0.9).all()
    assert openings.std(1).mean() > 0.02  # the mouth moves


def test_emotion_changes_the_face_and_speech_only_the_mouth():
    g = torch.Generator().manual_seed(3)
    identity = faces.Identity.sample(1, g)
    size = 48
    frame = lambda opening, emotion: faces.render_frames(  # noqa: E731
        torch.tensor([opening]), torch.tensor([emotion]), identity, size)[0]
    xs, ys = faces.grid(size)
    y = ys - identity.shift[0, 1]
    mouth_rows = (y > 0.2) & (y < 0.75)
    upper_face = y < -0.1
    wide, shut = frame(0.18, 0), frame(0.03, 0)
    changed = (wide - shut).abs().sum(0) > 1e-3
    assert changed[mouth_rows].any() and not changed[upper_face].any()
    for emotion in range(1, len(faces.EMOTIONS)):
        other = (frame(0.1, emotion) - frame(0.1, 0)).abs().sum(0) > 1e-2
        assert other[upper_face].any()  # brows, eyes, tint
        assert other[mouth_rows].any()  # mouth corners and width, tint


def test_emotions_typical_openings_differ():
    """The judge's data ties openings to emotions (the shortcut)."""
    g = torch.Generator().manual_seed(0)
    emotions = torch.arange(4).repeat(500)
    openings = faces.typical_openings(emotions, g)
    means = torch.stack([openings[emotions == e].mean() for e in range(4)])
    assert means.argsort().tolist() == [2, 0, 1, 3]  # sad < neutral < happy < surprised


@pytest.fixture(scope="module")
def world():
    from tqdm.auto import tqdm

    settings = spfem.Settings(setup_steps=150)
    with tqdm(disable=True) as progress:
        return spfem.build_world(settings, progress), settings


def test_opening_regressor_measures_rendered_openings(world):
    """The speech measurement on rendered clips with known openings: within
    a tenth of the speech range on average."""
    world, settings = world
    clips = spfem.make_clips(16, settings, seed=999)
    with torch.no_grad():
        predicted = spfem.predict_openings(world.regressor, clips.clips)
        result = spfem.measure(world, clips, clips.clips)
    lo, hi = faces.OPENING_RANGE
    assert (predicted - clips.openings).abs().mean() < 0.1 * (hi - lo)
    assert result["lip_sync"] > 0.8
    assert result["outside_change"] == 0
    # the held-out classifier reads the expression of rendered target clips
    targets = faces.render_clips(clips.openings, clips.targets, clips.identity, settings.size)
    with torch.no_grad():
        assert spfem.measure(world, clips, targets)["expression_accuracy"] > 0.8


def test_tiny_study_end_to_end_and_reproducible(tmp_path):
    args = ["--configs", "none,full", "--seeds", "1", "--steps", "3", "--setup-steps", "5"]
    spfem.main(args + ["--out", str(tmp_path)])
    torch.manual_seed(12345)  # whatever the global state, the same study
    spfem.main(args + ["--out", str(tmp_path / "again")])
    runs = json.loads((tmp_path / "results.json").read_text())
    assert runs == json.loads((tmp_path / "again" / "results.json").read_text())
    assert [(r["config"], r["seed"]) for r in runs] == [("none", 0), ("full", 0)]
    for r in runs:
        for key in spfem.METRICS:
            assert isinstance(r[key], float) and r[key] == r[key]  # not NaN
    for name in ("results.csv", "table.md", "figure.png", "setup.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| full | 1 |" in (tmp_path / "table.md").read_text()


def test_unknown_configuration_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        spfem.main(["--configs", "none,bogus", "--out", str(tmp_path)])
