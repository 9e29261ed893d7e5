"""WCAG AA contrast of the page, computed from the stylesheet's own colours, in light and dark mode.

AA asks 4.5:1 for normal text. Every pair below is a foreground the page draws on a background it
draws it on (text, muted text, links and buttons in the accent colour, text on accent buttons).
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT

CSS = ROOT / "templates" / "static" / "app.css"
PAIRS = [
    ("text", "bg"),
    ("text", "surface"),
    ("text", "surface-2"),
    ("muted", "bg"),
    ("muted", "surface"),
    ("muted", "surface-2"),
    ("accent", "surface"),  # "More like this" links
    ("accent", "bg"),
    ("accent-text", "accent"),  # primary buttons
]


def _palette(block: str) -> dict[str, str]:
    return dict(re.findall(r"--([a-z0-9-]+):\s*(#[0-9a-fA-F]{6})\b", block))


def palettes() -> dict[str, dict[str, str]]:
    css = CSS.read_text()
    light = _palette(re.search(r":root\s*{(.*?)}", css, re.S).group(1))  # type: ignore[union-attr]
    dark_block = re.search(r"prefers-color-scheme:\s*dark\)\s*{\s*:root\s*{(.*?)}", css, re.S)
    assert dark_block, "the stylesheet has no dark-mode palette"
    return {"light": light, "dark": {**light, **_palette(dark_block.group(1))}}


def luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula_matches_known_values() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


@pytest.mark.parametrize("mode", ["light", "dark"])
@pytest.mark.parametrize(("fg", "bg"), PAIRS)
def test_aa_contrast(mode: str, fg: str, bg: str) -> None:
    colours = palettes()[mode]
    ratio = contrast(colours[fg], colours[bg])
    assert ratio >= 4.5, (
        f"{mode}: --{fg} {colours[fg]} on --{bg} {colours[bg]} is {ratio:.2f}:1, AA needs 4.5:1"
    )
