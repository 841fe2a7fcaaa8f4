"""The main job's findings: each claim of the reference paper decided by a paired test over images.

How it connects: ``studies/replicate.py`` measures each checkpoint and keeps, beside the
summary numbers, ``per_image`` blocks ``{"ids": [...], quantity: [...]}``
(`mechbiqa.analysis.replication.analyse_store`, `grounding_per_image`,
`image_token_patching`, the instability per image of `mechbiqa.analysis.per_image`);
`judge` compares the blocks of the one-stage and two-stage checkpoints on the image ids
both share (`mechbiqa.analysis.per_image.aligned`) and decides each finding with
`mechbiqa.analysis.findings` (paired sign-flip permutation tests, paired bootstraps of SRCC
differences, `decide`). `split_untested` sets apart the findings whose test is undefined on
the run's images. Nothing here prints; `mechbiqa.reports.comparison_report` shows them.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from mechbiqa.analysis.findings import Finding, decide, paired_bootstrap, paired_permutation, srcc_rows
from mechbiqa.analysis.per_image import aligned
from mechbiqa.analysis.replication_attribution import IMAGE_VS_DESCRIPTION_CONTRAST, image_vs_description

__all__ = ["UNDEFINED", "judge", "split_untested"]

UNDEFINED = "untestable on these images: the statistic is undefined (a constant score has no SRCC)"
"""The ``evidence`` of a finding whose test statistic is not finite on the run's images."""


def judge(m: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finding of the paper decided by a paired test over the images both checkpoints saw.

    ``m[mode]["per_image"]`` holds blocks ``{"ids": [...], quantity: [...]}`` (`analyse_store`,
    `main`); a quantity is compared on the image ids both blocks share. Held: the test rejects "no
    difference" at 5% in the claimed direction (`mechbiqa.analysis.findings.decide`). A finding
    whose data are missing is left out; one that only one checkpoint can have compares like with like.
    """
    one, two = m["one-stage"].get("per_image", {}), m["two-stage"].get("per_image", {})
    out: list[Finding] = []
    contrast: dict[str, str] = {}  # claim -> what the effect is the difference of

    def paired(claim: str, block: str, key: str, direction: Literal["greater", "less"], units: str) -> None:
        if key in one.get(block, {}) and key in two.get(block, {}):
            a, b = aligned(one[block], two[block], key)
            out.append(decide(claim, paired_permutation(a, b, units=units), direction))

    if "store" in one and "store" in two:
        (a, b), (y, _) = (aligned(one["store"], two["store"], k) for k in ("score", "mos"))
        out.append(decide("Two-stage tuning rates better than one-stage (SRCC against the label).",
                          paired_bootstrap(srcc_rows, a, b, y, units="SRCC"), "greater"))
    paired("Two-stage answers are more stable under sampling (paper: 22% -> 12%).", "instability",
           "instability", "less", "unstable answers per session")
    paired("Two-stage answers hit the label's level more often (paper: 52.5% -> 61.2%).", "instability",
           "accuracy", "greater", "share of answers")
    paired("The two-stage quality token gives the description a larger share of its non-image attention "
           "than the one-stage one.", "attention", "description_share", "greater", "share of non-image mass")
    patch = one.get("patching", {})
    if "dominant" in patch and "random" in patch:  # one-stage only: the two-stage prompt has no image token
        claim = ("Ablating the five dominant image tokens moves the one-stage score more than five "
                 "random ones.")
        contrast[claim] = "dominant - random, same images"
        test = paired_permutation(patch["random"], patch["dominant"], units="|delta score|")
        out.append(decide(claim, test, "greater"))
    paired("One-stage answers flip more across intermediate layers (logit lens).",
           "lens", "changes", "less", "answer changes")
    paired("Two-stage answers contradict the model's own description less often.", "grounding",
           "contradiction", "less", "share of images")
    for mode in ("one-stage", "two-stage"):  # Q-Scorer: head vs level words on the same held-out images
        head = (m[mode].get("probes") or {}).get("per_image") or {}
        if "mlp_head" in head and "level_word" in head:
            claim = (f"A regression head on the quality position's hidden state rates better than the "
                     f"level words (Q-Scorer; {mode}).")
            contrast[claim] = "MLP head - level words, same held-out images"
            test = paired_bootstrap(srcc_rows, head["level_word"], head["mlp_head"], head["mos"],
                                    units="SRCC")
            out.append(decide(claim, test, "greater"))
    decodable = (m["one-stage"].get("probes") or {}).get("probe_decodable_layer")
    if decodable is not None and "settle" in one.get("lens", {}):
        settle = np.asarray(one["lens"]["settle"], dtype=float)
        claim = (f"In the one-stage model quality is linearly decodable (probe, layer {decodable}) "
                 "before the layer where each image's answer settles (logit lens).")
        contrast[claim] = "settle layer - probe layer"
        test = paired_permutation(np.full_like(settle, decodable), settle, units="layers")
        out.append(decide(claim, test, "greater"))
    written = image_vs_description(one.get("dla"))  # the decision's write by source role (DLA), one-stage
    if written is not None:
        contrast[written.claim] = IMAGE_VS_DESCRIPTION_CONTRAST
        out.append(written)

    def defined(f: Finding) -> bool:
        r = f.result
        return r is not None and bool(np.isfinite([r.effect, r.p_value, *r.ci]).all())

    return [f.to_dict() | {"contrast": contrast.get(f.claim, "two-stage - one-stage")}
            | ({} if defined(f) else {"evidence": UNDEFINED}) for f in out]


def split_untested(findings: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The findings `judge` decided, and those whose test is undefined on these images (inconclusive)."""
    tested = [f for f in findings if UNDEFINED not in f.get("evidence", "")]
    return tested, [f for f in findings if UNDEFINED in f.get("evidence", "")]
