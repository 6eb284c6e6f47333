"""Colours and axis labels shared by the interactive plots and the PNG figures.

Colours are the Okabe-Ito palette (distinct for the common colour-vision deficiencies and
in greyscale print when paired with markers); sequential maps are single-hue.
"""

from __future__ import annotations

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
PLOTLY_SYMBOLS = ["circle", "square", "triangle-up", "diamond", "triangle-down", "cross", "x", "star"]
POS_COLOR, NEG_COLOR = "#D55E00", "#0072B2"
SEQUENTIAL = "Blues"

METRIC_LABELS = {
    "mean": "mean activation per counted token (SAE units)",
    "mean_active": "mean activation when active (SAE units)",
    "density": "density (fraction of counted tokens active)",
}
SHORT_LABELS = {"mean": "mean per token (SAE units)", "mean_active": "mean when active (SAE units)",
                "density": "density (fraction of tokens)"}
METRIC_TITLES = {"mean": "Mean activation", "mean_active": "Mean when active", "density": "Density"}


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def pair_label(sae: str, group: str, several_saes: bool) -> str:
    """Legend name of a (sae, group): the position group, prefixed by the SAE when a run has several."""
    return f"{sae} / {group}" if several_saes else group
