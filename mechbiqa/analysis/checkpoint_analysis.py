"""Every analysis the main job makes of one checkpoint, as one function a process can run on its own.

`analyse_checkpoint` opens the checkpoint, rates the test images and records each rating's own
scoring prompt into its store (`mechbiqa.analysis.replication.rated_store`); reads the logit
lens, the attention attribution, the probes and the paper's figures off that store; then direct
logit attribution, the tuned lens and attribution patching
(`mechbiqa.analysis.replication_attribution`); then the online studies: instability under
sampling, grounding (image path vs own-description path), and patching of the five dominant
image tokens where image tokens reach the quality position. The main job runs it once per
checkpoint, on a CPU two side by side (`mechbiqa.train.side_by_side`): what it needs comes in
its arguments, what it finds goes back in its return value, and its files land under
``CheckpointAnalysis.out``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechbiqa.analysis.paper_figures import paper_figures
from mechbiqa.analysis.replication import (
    ProbeSettings,
    analyse_store,
    grounding_per_image,
    image_token_patching,
    instability_section,
    lens_read_out,
    rated_store,
)
from mechbiqa.analysis.replication_attribution import AttributionSettings, attribution_analysis
from mechbiqa.sources import open_source, spread

__all__ = ["CheckpointAnalysis", "analyse_checkpoint"]


@dataclass(frozen=True)
class CheckpointAnalysis:
    """How one checkpoint is analysed (the main job's settings).

    Attributes:
        out: Folder of the stores, figures and JSON (``<cache>/replicate``).
        dtype: Dtype the checkpoint is loaded in.
        device: ``cpu``, ``cuda`` ...
        store_dtype: Activation dtype of the store.
        probes: The probes of the store.
        n_instability: Test images of the instability study (spread over the test images).
        n_patch: Test images of the dominant-token patching.
        attribution: Overrides of `AttributionSettings`.
        companion: A companion checkpoint (RL, Q-Scorer): its attribution patching is not checked against
            activation patching, and its dominant tokens are not patched (the pair's comparison).
    """

    out: str
    dtype: str = "float32"
    device: str = "cpu"
    store_dtype: str = "float32"
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    n_instability: int = 48
    n_patch: int = 32
    attribution: dict[str, Any] = field(default_factory=dict)
    companion: bool = False


def analyse_checkpoint(mode: str, path: str | Path, test: Sequence[Any], settings: CheckpointAnalysis,
                       progress: Callable[[Any], None] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Every analysis of one checkpoint on ``test``.

    Args:
        mode: Its name in file names and results (``one-stage``, ``two-stage``, ``rl`` ...).
        path: The checkpoint (a one-stage folder, or a two-stage pair's folder).
        test: The test records it rates.
        settings: How.
        progress: Called with ``(mode, step)`` after each step.

    Returns:
        The metrics (`analyse_store`'s, with ``paper_figures``, ``attribution``, the instability and
        grounding sections, ``patching`` where made, and their ``per_image`` values) and each step's seconds.
    """
    out, seconds, clock, test = Path(settings.out), {}, time.perf_counter(), list(test)

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
        if progress is not None:
            progress((mode, name))

    checkpoint = open_source(path, dtype=settings.dtype, device=settings.device)  # loaded once
    store = rated_store(checkpoint.rater, test, out / f"{mode}.h5", settings.store_dtype)
    lap(f"rate + record store ({mode})")
    m = analyse_store(store, checkpoint.rater, settings.probes, out / f"probes-{mode}")
    m["paper_figures"] = paper_figures(store, out / f"paper-{mode}", title=mode,
                                       read_out=lens_read_out(checkpoint.rater))  # Figs. 3, 5, 6
    lap(f"lens, attribution, probes from the store ({mode})")
    checked = AttributionSettings(**{"validate": not settings.companion, **settings.attribution})
    m["attribution"], extra = attribution_analysis(checkpoint, store, test, out / f"attribution-{mode}",
                                                   checked)  # fmt: skip
    m["per_image"].update(extra)
    lap(f"logit attribution, tuned lens, attribution patching ({mode})")
    sampled, per_image = instability_section(checkpoint, spread(test, settings.n_instability), mode)
    m.update(sampled)
    m["per_image"]["instability"] = per_image
    lap(f"instability ({mode})")
    m["grounding"], m["per_image"]["grounding"] = grounding_per_image(checkpoint.rater, test)
    lap(f"grounding ({mode})")
    if checkpoint.image_at_quality and not settings.companion:  # a stage 2 reads text only
        m["patching"], m["per_image"]["patching"] = image_token_patching(
            checkpoint, spread(test, settings.n_patch), out)
        lap("patching")
    return m, seconds
