"""The reference paper's figures and Table 1, computed from an activation store (no plotting here).

Where it sits: the main job (``studies/replicate.py``) records one store per checkpoint
(`mechbiqa.analysis.replication.rated_store`); `paper_figures` reads one of them and
returns the numbers each of the paper's exhibits draws, as the paper draws them:

* **Fig. 3** (`fig3_top_candidates`): the logit lens of *one* image at the quality
  position, the top-4 candidate tokens of the full vocabulary at every layer;
* **Fig. 5** (`fig5_role_aligned_attention`): the quality position's attention over
  layers x key positions, averaged over samples *aligned by role*: positions are grouped
  into runs of one role (bos, instruction, image, description ...); image tokens align by
  their index inside the image, fixed-length runs position by position, and runs whose
  length varies (the descriptions) by relative position in equal bins, so descriptions of
  different lengths do not blur into the tokens after them;
* **Fig. 6** (`fig6_level_frequency`): for the samples whose label is "poor", how often
  each level word is the per-layer argmax (softmax over the five level words, the Q-Align
  rule) over the last layers;
* **Table 1** (`table1_rows`): the instability ratio per session and its mean ± std per
  tuning, with the level accuracy (from `mechbiqa.analysis.instability.InstabilityResult`).

`mechbiqa.figures` draws them (`fig3_candidates`, `fig5_attention`, `fig6_levels`) and
`mechbiqa.reports` renders Table 1 (`table1`). Every result has ``to_dict`` (strict-JSON
ready through `mechbiqa.outputs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mechbiqa.analysis.attribution import PATTERN
from mechbiqa.analysis.lens import RESID, analyse_lens, check_lens
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.model.roles import ROLE_LABELS, Role

if TYPE_CHECKING:
    from mechbiqa.analysis.instability import InstabilityResult
    from mechbiqa.analysis.lens import Lens
    from mechbiqa.store import ActivationStore

__all__ = [
    "Fig3Data",
    "Fig5Data",
    "Fig6Data",
    "Table1Row",
    "fig3_top_candidates",
    "fig5_role_aligned_attention",
    "fig6_level_frequency",
    "label_levels",
    "paper_figures",
    "role_runs",
    "table1_rows",
]


# ----------------------------------------------------------------------------- reading the store
def _quality_rows(store: ActivationStore) -> np.ndarray:
    """Valid samples with a quality position (the only ones the lens and attention rows exist for)."""
    rows = store.valid[store.counts("quality") > 0]
    if not len(rows):
        raise LookupError(
            f"no sample of {store.path} has a token with role 'quality'; record a store of scoring "
            "prompts (studies/cache_activations.py --mode score)"
        )
    return rows


def _resid(store: ActivationStore, rows: np.ndarray) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``[layer, sample, d_model]`` residuals at the quality position, and the layer numbers."""
    try:
        spec = store.spec_of(RESID, "quality")
    except KeyError as error:
        raise LookupError(
            f"the logit-lens figures need hook {RESID} at the quality position; {store.path} lacks it "
            f"({error.args[0]}); record it with studies/cache_activations.py --spec 'default'"
        ) from None
    resid = store.get(RESID, "quality", samples=rows)[:, :, 0]  # [sample, layer, d_model]
    return torch.from_numpy(np.ascontiguousarray(resid.transpose(1, 0, 2))).float(), tuple(spec.layers)


def label_levels(store: ActivationStore, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[sample]`` level index of each sample's label (0 = excellent .. 4 = bad; -1 unknown).

    The record's own ``level_word`` when it has one (the data set's labelling); otherwise the
    0-1 label cut into five equal-width bins (Q-Align's rule, `mechbiqa.analysis.conversion`).
    """
    out = np.full(len(rows), -1, dtype=np.int64)
    labels = np.asarray(store.labels(rows), dtype=np.float64)
    for i, (record, label) in enumerate(zip(store.records(rows), labels, strict=True)):
        word = record.get("level_word") if isinstance(record, dict) else None
        if word in LEVEL_WORDS:
            out[i] = LEVEL_WORDS.index(word)
        elif np.isfinite(label) and 0 <= label <= 1:
            out[i] = len(LEVEL_WORDS) - 1 - min(len(LEVEL_WORDS) - 1, int(np.floor(label * len(LEVEL_WORDS))))
    return out


# ----------------------------------------------------------------------------- Fig. 3
@dataclass(frozen=True)
class Fig3Data:
    """The logit lens of one image: the top candidates of the full vocabulary at every layer.

    Attributes:
        sample_id: The image's sample id.
        label: Its 0-1 label (NaN when unrated).
        layers: ``[layer]`` layer numbers.
        top_ids: ``[layer, k]`` token ids, most probable first.
        top_tokens: ``[layer][k]`` their text ("" without a tokenizer).
        top_probs: ``[layer, k]`` their full-vocabulary probabilities.
        level_probs: ``[layer, level]`` softmax over the five level words only.
        answer: ``[layer]`` the level word argmax per layer.
        choice: Why this image (``"given"`` or the rule that picked it).
    """

    sample_id: str
    label: float
    layers: np.ndarray
    top_ids: np.ndarray
    top_tokens: tuple[tuple[str, ...], ...]
    top_probs: np.ndarray
    level_probs: np.ndarray
    answer: tuple[str, ...]
    choice: str = "given"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "sample_id": self.sample_id,
            "label": self.label,
            "layers": self.layers.tolist(),
            "top_ids": self.top_ids.tolist(),
            "top_tokens": [list(t) for t in self.top_tokens],
            "top_probs": self.top_probs.tolist(),
            "level_probs": self.level_probs.tolist(),
            "answer": list(self.answer),
            "choice": self.choice,
        }


@torch.no_grad()
def fig3_top_candidates(
    store: ActivationStore,
    lens: Lens,
    level_ids: Sequence[int],
    *,
    sample: str | None = None,
    k: int = 4,
    tokenizer: Any | None = None,
) -> Fig3Data:
    """The paper's Fig. 3: one image's top-``k`` candidate tokens at the quality position, per layer.

    Args:
        store: An open store holding `RESID` at ``quality``, every layer.
        lens: The read-out of the model the store was recorded from.
        level_ids: Token ids of the five level words (for the level probabilities and answers).
        sample: The image's sample id; None: the image whose level-word answer changes most
            often across layers (first in store order on ties). Research choice: the paper's
            figure shows an image whose intermediate layers waver between levels.
        k: Candidates per layer (the paper's 4).
        tokenizer: Decodes the candidates (``decode([id])``).

    Raises:
        LookupError: The store lacks the residuals or the sample.
    """
    check_lens(store, lens)
    rows = _quality_rows(store)
    resid, layers = _resid(store, rows)
    ids = store.ids(rows)
    ids_t = torch.as_tensor(list(level_ids), dtype=torch.long)
    if sample is None:
        answers = np.stack(
            [_level_logits(lens, resid[i], layer, ids_t).argmax(-1).numpy() for i, layer in enumerate(layers)]
        )  # [layer, sample]
        changes = (answers[1:] != answers[:-1]).sum(0)
        j, choice = int(np.argmax(changes)), "most answer changes across layers"
    else:
        if sample not in ids:
            raise LookupError(
                f"sample {sample!r} is not among the samples of {store.path} with a quality "
                f"position ({len(ids)} of them, e.g. {ids[:3]})"
            )
        j, choice = ids.index(sample), "given"
    top_ids, top_probs, level_probs = [], [], []
    for i, layer in enumerate(layers):
        logits = lens(resid[i, j : j + 1], int(layer)).double()[0]  # [vocab]
        probs = logits.softmax(-1)
        values, order = probs.topk(min(k, probs.shape[-1]))
        top_ids.append(order.cpu().numpy())
        top_probs.append(values.cpu().numpy())
        level_probs.append(logits[ids_t.to(logits.device)].softmax(-1).cpu().numpy())
    top = np.stack(top_ids)
    tokens = tuple(
        tuple(tokenizer.decode([int(t)]) if tokenizer is not None else "" for t in row) for row in top
    )
    levels = np.stack(level_probs)
    return Fig3Data(
        sample_id=ids[j],
        label=float(store.labels(rows)[j]),
        layers=np.asarray(layers),
        top_ids=top,
        top_tokens=tokens,
        top_probs=np.stack(top_probs),
        level_probs=levels,
        answer=tuple(LEVEL_WORDS[a] for a in levels.argmax(-1)),
        choice=choice,
    )


def _level_logits(lens: Lens, resid: torch.Tensor, layer: int, ids: torch.Tensor) -> torch.Tensor:
    logits = lens(resid, int(layer)).double()
    return logits[..., ids.to(logits.device)].cpu()


# ----------------------------------------------------------------------------- Fig. 5
def role_runs(roles: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of one role in an unpadded role sequence: ``[(role, start, stop), ...]``."""
    roles = np.asarray(roles)
    if not len(roles):
        return []
    cuts = np.flatnonzero(roles[1:] != roles[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(roles)]])
    return [(int(roles[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


@dataclass(frozen=True)
class Fig5Data:
    """Attention of the quality position over layers x role-aligned columns, mean over heads and samples.

    Attributes:
        layers: ``[layer]`` layer numbers.
        heat: ``[layer, column]`` mean attention per key (a binned run: mean over its tokens in the bin).
        column_roles: ``[column]`` `Role` value of each column.
        segments: One dict per run: ``role``, ``start``/``stop`` (columns), ``align`` (``"image index"``,
            ``"position"`` or ``"relative, N bins"``), ``min_length``/``max_length`` (tokens).
        sample_ids: The samples averaged.
        n_excluded: Samples left out because their role runs differ from the most common prompt
            layout (another template, an answer without a description ...).
    """

    layers: np.ndarray
    heat: np.ndarray
    column_roles: np.ndarray
    segments: tuple[dict[str, Any], ...]
    sample_ids: tuple[str, ...]
    n_excluded: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "layers": self.layers.tolist(),
            "heat": self.heat.tolist(),
            "column_roles": [ROLE_LABELS[r] for r in self.column_roles],
            "segments": list(self.segments),
            "n_samples": len(self.sample_ids),
            "n_excluded": self.n_excluded,
        }


def fig5_role_aligned_attention(store: ActivationStore, *, bins: int = 16) -> Fig5Data:
    """The paper's Fig. 5: the quality row's attention averaged over samples aligned by role.

    Each sample's positions are cut into runs of one role; samples whose sequence of run roles
    differs from the most common one are left out (counted). Run by run:

    * image tokens: one column per index inside the image (the 65 tokens align exactly);
    * a run of the same length in every sample (bos, the template's instruction): one column per
      position;
    * a run whose length varies (the description): ``min(bins, shortest length)`` columns, token
      ``j`` of ``n`` in column ``floor(j * columns / n)``; a column holds the mean attention of
      its tokens, so every sample contributes to every column.

    Args:
        store: An open store holding `PATTERN` at ``quality``.
        bins: Most columns of a run whose length varies.

    Raises:
        LookupError: The store lacks the attention rows or any sample with a quality position.
    """
    if bins < 1:
        raise ValueError(f"bins={bins}: pass at least 1")
    try:
        spec = store.spec_of(PATTERN, "quality")
    except KeyError as error:
        raise LookupError(
            f"Fig. 5 needs hook {PATTERN} at the quality position; {store.path} lacks it ({error.args[0]}); "
            "record it with studies/cache_activations.py --spec 'default'"
        ) from None
    rows = _quality_rows(store)
    roles = store.roles(rows)
    image_index = store.image_index(rows)
    lengths = store.n_positions(rows)
    runs = [role_runs(r[: int(n)]) for r, n in zip(roles, lengths, strict=True)]
    signature = [tuple(role for role, _, _ in rs) for rs in runs]
    common = Counter(signature).most_common(1)[0][0]
    keep = [i for i, s in enumerate(signature) if s == common]
    pattern = (
        store.get(PATTERN, "quality", samples=rows[keep])[:, :, :, 0].astype(np.float64).mean(2)
    )  # [s, l, key]
    columns: list[np.ndarray] = []  # per run: [sample, layer, column]
    segments, column_roles, start = [], [], 0
    for r, role in enumerate(common):
        spans = [runs[i][r] for i in keep]
        sizes = np.array([b - a for _, a, b in spans])
        if role == int(Role.IMAGE):
            n_cols = int(max(image_index[i, a:b].max() for i, (_, a, b) in zip(keep, spans, strict=True))) + 1
            block = np.zeros((len(keep), pattern.shape[1], n_cols))
            for s, (i, (_, a, b)) in enumerate(zip(keep, spans, strict=True)):
                block[s][:, image_index[i, a:b]] = pattern[s][:, a:b]
            align = "image index"
        elif (sizes == sizes[0]).all():
            n_cols = int(sizes[0])
            block = np.stack([pattern[s][:, a:b] for s, (_, a, b) in enumerate(spans)])
            align = "position"
        else:
            n_cols = int(min(bins, sizes.min()))
            block = np.zeros((len(keep), pattern.shape[1], n_cols))
            for s, (_, a, b) in enumerate(spans):
                which = np.arange(b - a) * n_cols // (b - a)  # column of each token
                for c in range(n_cols):
                    block[s][:, c] = pattern[s][:, a:b][:, which == c].mean(-1)
            align = f"relative, {n_cols} bins"
        columns.append(block)
        segments.append(
            {
                "role": ROLE_LABELS[role],
                "start": start,
                "stop": start + n_cols,
                "align": align,
                "min_length": int(sizes.min()),
                "max_length": int(sizes.max()),
            }
        )
        column_roles += [role] * n_cols
        start += n_cols
    heat = np.concatenate(columns, axis=-1).mean(0)
    return Fig5Data(
        layers=np.asarray(spec.layers),
        heat=heat,
        column_roles=np.asarray(column_roles, dtype=np.int8),
        segments=tuple(segments),
        sample_ids=tuple(store.ids(rows[keep])),
        n_excluded=len(rows) - len(keep),
    )


# ----------------------------------------------------------------------------- Fig. 6
@dataclass(frozen=True)
class Fig6Data:
    """How often each level word is the per-layer argmax, over the last layers, for one label.

    Attributes:
        label: The label level word the samples share (the paper's "poor").
        layers: ``[layer]`` the last layers.
        counts: ``[layer, level]`` samples whose argmax at the layer is the level.
        sample_ids: The samples with that label.
    """

    label: str
    layers: np.ndarray
    counts: np.ndarray
    sample_ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def frequency(self) -> np.ndarray:
        """``[layer, level]`` share of the samples (NaN without samples)."""
        n = len(self.sample_ids)
        return self.counts / n if n else np.full(self.counts.shape, np.nan)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fig6Data:
        """The inverse of `to_dict` (e.g. read back from the main job's summary)."""
        return cls(
            label=d["label"],
            layers=np.asarray(d["layers"]),
            counts=np.asarray(d["counts"], dtype=np.int64),
            sample_ids=tuple(d.get("sample_ids") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "label": self.label,
            "layers": self.layers.tolist(),
            "level_words": list(LEVEL_WORDS),
            "counts": self.counts.tolist(),
            "frequency": self.frequency.tolist(),
            "n_samples": len(self.sample_ids),
            "sample_ids": list(self.sample_ids),
        }


def fig6_level_frequency(
    store: ActivationStore,
    lens: Lens,
    level_ids: Sequence[int],
    *,
    label: str = "poor",
    last: int = 8,
) -> Fig6Data:
    """The paper's Fig. 6: for the samples labelled ``label``, the frequency of each level as the argmax.

    The argmax at a layer is over the five level words (softmax over their logits only, as the
    final answer is read; `mechbiqa.analysis.lens.analyse_lens`). A sample's label level is its
    record's ``level_word``, else its 0-1 label in five equal-width bins (`label_levels`).

    Args:
        store: An open store holding `RESID` at ``quality``.
        lens: The read-out of the model the store was recorded from.
        level_ids: Token ids of the five level words.
        label: The label level word (the paper's "poor").
        last: How many of the last layers (all when fewer).
    """
    if label not in LEVEL_WORDS:
        raise ValueError(f"label {label!r} is not a level word; pass one of {LEVEL_WORDS}")
    if last < 1:
        raise ValueError(f"last={last}: pass at least 1 layer")
    check_lens(store, lens)
    rows = _quality_rows(store)
    chosen = np.flatnonzero(label_levels(store, rows) == LEVEL_WORDS.index(label))
    resid, layers = _resid(store, rows)
    tail = slice(max(0, len(layers) - last), len(layers))
    counts = np.zeros((len(layers[tail]), len(LEVEL_WORDS)), dtype=np.int64)
    if len(chosen):
        answer = analyse_lens(
            lens, resid[tail, chosen], level_ids, layers[tail], top_k=1
        ).answer  # [layer, sample]
        for i in range(len(counts)):
            counts[i] = np.bincount(answer[i], minlength=len(LEVEL_WORDS))
    ids = store.ids(rows)
    return Fig6Data(
        label=label, layers=np.asarray(layers[tail]), counts=counts, sample_ids=tuple(ids[i] for i in chosen)
    )


# ----------------------------------------------------------------------------- Table 1
@dataclass(frozen=True)
class Table1Row:
    """One tuning's row of the paper's Table 1 (instability of sampled answers).

    Attributes:
        method: The tuning (``one-stage``, ``two-stage``).
        sessions: ``[session]`` instability ratio of each session (seed).
        mean: Mean over sessions.
        std: Sample standard deviation over sessions (ddof=1; 0 for one session).
        accuracy: Mean level accuracy of the answers over sessions (NaN without labels).
        n_images: Images per session.
        n_answers: Answers per image.
    """

    method: str
    sessions: tuple[float, ...]
    mean: float
    std: float
    accuracy: float
    n_images: int
    n_answers: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Table1Row:
        """The inverse of `to_dict` (None for a NaN written as null)."""
        nan = float("nan")
        return cls(
            method=d["method"],
            sessions=tuple(nan if x is None else float(x) for x in d["sessions"]),
            mean=nan if d["mean"] is None else float(d["mean"]),
            std=nan if d["std"] is None else float(d["std"]),
            accuracy=nan if d.get("accuracy") is None else float(d["accuracy"]),
            n_images=int(d["n_images"]),
            n_answers=int(d["n_answers"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "method": self.method,
            "sessions": list(self.sessions),
            "mean": self.mean,
            "std": self.std,
            "accuracy": self.accuracy,
            "n_images": self.n_images,
            "n_answers": self.n_answers,
        }


def table1_rows(results: Mapping[str, InstabilityResult]) -> list[Table1Row]:
    """The paper's Table 1: per tuning, the instability ratio of each session and mean ± std.

    Args:
        results: Tuning name -> its `InstabilityResult` (same images and seeds for each).
    """
    rows = []
    for method, r in results.items():
        ratio = np.asarray(r.ratio, dtype=np.float64)
        accuracy = np.asarray(r.accuracy, dtype=np.float64)
        _, n_images, n_answers = np.asarray(r.levels).shape
        rows.append(
            Table1Row(
                method=method,
                sessions=tuple(float(x) for x in ratio),
                mean=float(ratio.mean()),
                std=float(ratio.std(ddof=1)) if len(ratio) > 1 else 0.0,
                accuracy=float(accuracy.mean()) if np.isfinite(accuracy).all() else float("nan"),
                n_images=int(n_images),
                n_answers=int(n_answers),
            )
        )
    return rows


# ----------------------------------------------------------------------------- all of them
def paper_figures(
    store_path: str | Path,
    out_dir: str | Path,
    *,
    read_out: tuple[Lens, Any] | None = None,
    sample: str | None = None,
    k: int = 4,
    last: int = 8,
    label: str = "poor",
    bins: int = 16,
    instability: Mapping[str, InstabilityResult] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Figs. 3, 5 and 6 of one store (and Table 1 when instability results are given), drawn to PNGs.

    Writes ``fig3_candidates.png``, ``fig5_attention.png`` (only when the store holds the
    attention rows), ``fig6_levels.png`` and ``paper_figures.json`` (the data below) into
    ``out_dir``.

    Args:
        store_path: A store of scoring prompts (``studies/replicate.py``'s ``<mode>.h5``).
        out_dir: Where the PNGs and JSON go.
        read_out: ``(lens, tokenizer)`` of the model the store was recorded from; None: read from
            the checkpoint the store names (`mechbiqa.sources.load_lens`).
        sample: Fig. 3's image (sample id); None: the one whose answer changes most across layers.
        k: Fig. 3's candidates per layer.
        last: Fig. 6's last layers.
        label: Fig. 6's label level word.
        bins: Fig. 5's most columns for a run of varying length (the description).
        instability: Tuning -> `InstabilityResult`, for Table 1 (optional).
        title: Prefix of the figure titles (e.g. the checkpoint's name).

    Returns:
        ``{"fig3": ..., "fig5": ... or None, "fig6": ..., "table1": [...] or None, "files": {name: path}}``,
        JSON-ready.
    """
    from mechbiqa import figures, outputs
    from mechbiqa.scoring import level_ids as find_level_ids
    from mechbiqa.store import ActivationStore

    out = Path(out_dir)
    prefix = f"{title}: " if title else ""
    with ActivationStore.open(store_path) as store:
        if read_out is None:
            from mechbiqa.sources import load_lens, stored_model

            read_out = load_lens(stored_model(store))
        lens, tokenizer = read_out
        ids = find_level_ids(tokenizer)
        fig3 = fig3_top_candidates(store, lens, ids, sample=sample, k=k, tokenizer=tokenizer)
        fig6 = fig6_level_frequency(store, lens, ids, label=label, last=last)
        fig5 = fig5_role_aligned_attention(store, bins=bins) if PATTERN + "@quality" in store.keys else None
    files = {
        "fig3": figures.fig3_candidates(fig3, out / "fig3_candidates.png", title=f"{prefix}Fig. 3"),
        "fig6": figures.fig6_levels(fig6, out / "fig6_levels.png", title=f"{prefix}Fig. 6"),
    }
    if fig5 is not None:
        files["fig5"] = figures.fig5_attention(fig5, out / "fig5_attention.png", title=f"{prefix}Fig. 5")
    data = {
        "store": str(store_path),
        "fig3": fig3.to_dict(),
        "fig5": None if fig5 is None else fig5.to_dict(),
        "fig6": fig6.to_dict(),
        "table1": None if instability is None else [r.to_dict() for r in table1_rows(instability)],
        "files": {name: str(path) for name, path in files.items()},
    }
    files["json"] = outputs.write_json(out / "paper_figures.json", data)
    data["files"]["json"] = str(files["json"])
    return data
