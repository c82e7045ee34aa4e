"""Rendered talking faces for the SPFEM study: a face whose expression is
drawn in its brows, eyes, mouth corners, mouth width and tint, and whose mouth
opening is the speech.

Every quantity is a closed-form function of the pixel grid (soft edges, no
randomness inside), so a frame is determined by its parameters: the speech
(a mouth opening per frame), the emotion and the identity of the clip.
"""

import math
from dataclasses import dataclass

import torch

EMOTIONS = ("neutral", "happy", "sad", "surprised")

# Per emotion: mouth-corner curvature (corners up > 0), mouth half-width, brow
# lift, brow slant (inner ends up > 0), eye half-height, skin tint (RGB).
CURVE = torch.tensor([0.0, 0.22, -0.22, 0.0])
MOUTH_WIDTH = torch.tensor([0.30, 0.40, 0.27, 0.22])
BROW_LIFT = torch.tensor([0.0, 0.04, 0.0, 0.13])
BROW_SLANT = torch.tensor([0.0, 0.0, 0.35, 0.0])
EYE_HEIGHT = torch.tensor([0.075, 0.045, 0.06, 0.12])
TINT = torch.tensor([[0.85, 0.72, 0.62], [0.92, 0.70, 0.58], [0.74, 0.72, 0.78],
                     [0.88, 0.78, 0.60]])

# The speech: mouth openings (half-heights, in face units) in this range.
OPENING_RANGE = (0.02, 0.20)
# The openings each emotion typically comes with in the frames the training
# classifier learns from (mean, spread): changing the opening is a shortcut to
# changing that classifier's mind.
TYPICAL_OPENING = torch.tensor([[0.08, 0.02], [0.13, 0.02], [0.04, 0.015], [0.18, 0.015]])

MOUTH_Y = 0.45
FACE_AXES = (0.78, 0.95)


def _soft(inside: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased indicator of `inside > 0`, about one pixel wide."""
    return torch.sigmoid(inside * size * 0.75)


@dataclass
class Identity:
    """What differs between clips besides speech and emotion: the face's
    offset and brightness, and the background's colour and stripes."""

    shift: torch.Tensor       # (N, 2) face offset (x, y)
    brightness: torch.Tensor  # (N,)
    background: torch.Tensor  # (N, 3)
    stripes: torch.Tensor     # (N,) stripe phase

    @staticmethod
    def sample(n: int, generator: torch.Generator) -> "Identity":
        r = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        return Identity(shift=(r(n, 2) - 0.5) * 0.12, brightness=0.85 + 0.15 * r(n),
                        background=0.15 + 0.35 * r(n, 3), stripes=r(n) * 2 * math.pi)

    def repeat(self, times: int) -> "Identity":
        """Each identity `times` times in a row (one per frame of its clip)."""
        return Identity(*(t.repeat_interleave(times, 0) for t in
                          (self.shift, self.brightness, self.background, self.stripes)))


def grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    return xs, ys


def face_mask(identity: Identity, size: int) -> torch.Tensor:
    """(N, size, size) soft mask of the face ellipse."""
    xs, ys = grid(size)
    x = xs - identity.shift[:, 0, None, None]
    y = ys - identity.shift[:, 1, None, None]
    return _soft(1 - (x / FACE_AXES[0]) ** 2 - (y / FACE_AXES[1]) ** 2, size)


def render_frames(openings: torch.Tensor, emotions: torch.Tensor, identity: Identity,
                  size: int = 48) -> torch.Tensor:
    """(N, 3, size, size) frames in [0, 1]: frame i has mouth opening
    openings[i], emotion emotions[i] and identity i."""
    xs, ys = grid(size)
    x = xs - identity.shift[:, 0, None, None]
    y = ys - identity.shift[:, 1, None, None]
    e = emotions.long()
    col = lambda v: v[:, None, None]  # noqa: E731
    face = face_mask(identity, size)
    # Mouth: an ellipse of half-width w and half-height `opening` whose
    # centre line bends by the emotion's curvature (corners up or down).
    w = col(MOUTH_WIDTH[e])
    u = x / w
    centre = MOUTH_Y - col(CURVE[e]) * u.clamp(-1, 1) ** 2 * w
    v = (y - centre) / col(openings.clamp_min(0.01))
    mouth = _soft(1 - u * u - v * v, size) * face
    # Lips: the ring between the mouth and a slightly larger ellipse.
    lip_v = (y - centre) / col(openings.clamp_min(0.01) + 0.04)
    lips = _soft(1 - (u / 1.1) ** 2 - lip_v * lip_v, size) * face * (1 - mouth)
    eyes = torch.zeros_like(x)
    brows = torch.zeros_like(x)
    for side in (-1.0, 1.0):
        ex = x - side * 0.33
        eyes = eyes + _soft(1 - (ex / 0.13) ** 2 - ((y + 0.25) / col(EYE_HEIGHT[e])) ** 2, size)
        # Brow: a bar above the eye; slant lifts its inner end (towards x = 0).
        inner = -side * ex  # > 0 towards the nose
        brow_y = -0.47 - col(BROW_LIFT[e]) - col(BROW_SLANT[e]) * inner.clamp(-0.15, 0.15)
        brows = brows + _soft(0.03 - (y - brow_y).abs(), size) * _soft(0.15 - ex.abs(), size)
    eyes, brows = eyes.clamp(0, 1) * face, brows.clamp(0, 1) * face
    skin = TINT[e][:, :, None, None] * identity.brightness[:, None, None, None]
    stripes = 0.5 + 0.5 * torch.sin(6 * xs + 3 * ys + col(identity.stripes))
    back = identity.background[:, :, None, None] * (0.8 + 0.2 * stripes[:, None])
    shade = (1 - 0.85 * mouth[:, None]) * (1 - 0.45 * lips[:, None]) \
        * (1 - 0.8 * eyes[:, None]) * (1 - 0.75 * brows[:, None])
    return back * (1 - face[:, None]) + skin * shade * face[:, None]


def speech(n: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """(n, frames) mouth openings: smooth random sequences (two sinusoids of
    random period and phase per clip), within OPENING_RANGE."""
    r = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    t = torch.arange(frames, dtype=torch.float32)
    periods = 3 + 9 * r(n, 2)
    phases = r(n, 2) * 2 * math.pi
    mix = 0.3 + 0.4 * r(n, 1)
    wave = (mix * torch.sin(2 * math.pi * t / periods[:, :1] + phases[:, :1])
            + (1 - mix) * torch.sin(2 * math.pi * t / periods[:, 1:] + phases[:, 1:]))
    lo, hi = OPENING_RANGE
    return lo + (hi - lo) * (0.5 + 0.5 * wave)


def render_clips(openings: torch.Tensor, emotions: torch.Tensor, identity: Identity,
                 size: int = 48) -> torch.Tensor:
    """(B, T, 3, size, size) clips: openings (B, T), emotions (B,), one
    identity per clip."""
    B, T = openings.shape
    frames = render_frames(openings.flatten(), emotions.repeat_interleave(T),
                           identity.repeat(T), size)
    return frames.unflatten(0, (B, T))


def typical_openings(emotions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Openings drawn from each emotion's typical range (TYPICAL_OPENING)."""
    mean, spread = TYPICAL_OPENING[emotions.long()].unbind(-1)
    lo, hi = OPENING_RANGE
    return (mean + spread * torch.randn(emotions.shape, generator=generator)).clamp(lo, hi)
