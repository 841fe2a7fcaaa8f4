"""Activation patching as one generic batched sweep: (hook name, positions, setter) -> effect on the rating.

Where it sits: `mechbiqa.model.MPLUGOwl2` exposes named hook points
(`mechbiqa_hooks.names`); `mechbiqa.analysis.attribution` says which image
tokens the quality position attends to; this module overwrites activations at
chosen positions and reads what the model then rates at the quality position
(the Q-Align score of `mechbiqa.scoring`, the good-minus-poor logit difference,
the answer). `studies/patch_image_tokens.py` builds the sweep of DESIGN.md
("Activation patching of the dominant image tokens") with `image_token_grid`
and renders `SweepResult` with `mechbiqa.reports` / `mechbiqa.figures`.

A sweep is a list of `Configuration`s; each is one or more `Edit`s, and an edit
is a hook name, the positions along its position axis, and a `Setter` (write
zeros, a mean activation, or a source run's activation). `sweep` stacks every
(configuration, clean input) pair along the batch axis, attaches **one** hook
per hook name that applies each row's own edits with a single indexed write,
and runs the stacked batch in chunks of ``batch_size`` rows: many
configurations cost a few forwards, not one forward each. Work that every row
would repeat is done once: each image is encoded once per sweep, the clean run
once, and a row that edits layer ``l`` from position ``p`` on starts from the
clean run's residual there, with the clean keys and values of the positions
before ``p`` (causal attention: nothing below ``l`` or before ``p`` can
differ), so it computes only ``(n_layers - l) x (n_pos - p)`` of the grid.

Positions are in the spliced sequence the model sees (select them by token
role, `mechbiqa.model.roles`). All clean inputs of one sweep share one prompt
length, so a position means the same slot in every row (the studies use one
prompt for all images).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS, EncodedPrompt
from mechbiqa.model.roles import batch_prompts
from mechbiqa.scoring import level_ids
from mechbiqa_hooks import names, patch

if TYPE_CHECKING:
    from mechbiqa.checkpoint import Checkpoint
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2

__all__ = [
    "SITES",
    "Configuration",
    "Edit",
    "ImageTokenPatching",
    "Readout",
    "Setter",
    "SetterKind",
    "SweepResult",
    "gather_activations",
    "image_token_grid",
    "patch_image_tokens",
    "read_quality",
    "sweep",
]

SetterKind = Literal["zero", "mean", "source"]

SITES: dict[str, tuple[str, ...]] = {
    # Research choice: "resid" edits the residual stream entering layer l (hook_resid_pre), so layers l.. all
    # read the edited image tokens; "kv" edits only the keys and values layer l computes from those tokens, so
    # the image rows themselves are untouched and only what later positions *read* from them at layer l
    # changes.
    "resid": (names.template(names.resid_pre(0)),),
    "kv": (names.template(names.attn(0, "k")), names.template(names.attn(0, "v"))),
}
"""Named edit sites: hook templates patched together for one layer."""


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Setter:
    """What an edit writes at its positions.

    Attributes:
        kind: ``"zero"`` (write zeros), ``"mean"`` (a mean activation) or ``"source"`` (the
            activation of another run, e.g. another image).
        values: None for ``"zero"``; else the values to write, with the same leading axes as the
            edit's positions: ``[k, *rest]`` for positions ``[k]`` or ``[clean, k, *rest]`` for
            positions ``[clean, k]`` (``rest`` = the hook's axes after the position axis).
    """

    kind: SetterKind
    values: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("zero", "mean", "source"):
            raise ValueError(f"Setter kind must be 'zero', 'mean' or 'source'; got {self.kind!r}")
        if (self.kind == "zero") != (self.values is None):
            raise ValueError(
                f"a {self.kind!r} setter needs values"
                if self.kind != "zero"
                else "a 'zero' setter takes no values"
            )

    @classmethod
    def zero(cls) -> Setter:  # noqa: D102
        return cls("zero")

    @classmethod
    def mean(cls, values: Tensor) -> Setter:  # noqa: D102
        return cls("mean", values)

    @classmethod
    def source(cls, values: Tensor) -> Setter:  # noqa: D102
        return cls("source", values)


@dataclass(frozen=True)
class Edit:
    """Overwrite one hook's activation at some positions.

    Attributes:
        hook: A hook name (`mechbiqa_hooks.names`), e.g. ``"llm.blocks.3.hook_resid_pre"``.
        positions: ``[k]`` positions shared by every clean input, or ``[clean, k]`` per clean input.
        setter: What to write there.
        pos_dim: The hook's position axis (1 for ``[batch, pos, ...]`` hooks; 2 for the query axis
            and 3 for the key axis of ``[batch, head, query_pos, key_pos]`` attention patterns).
    """

    hook: str
    positions: Tensor | Sequence[int] | np.ndarray  # stored as a long Tensor
    setter: Setter
    pos_dim: int = 1

    def __post_init__(self) -> None:
        positions = torch.as_tensor(self.positions, dtype=torch.long)
        object.__setattr__(self, "positions", positions)
        if positions.ndim not in (1, 2):
            raise ValueError(
                f"Edit {self.hook}: positions must be [k] or [clean, k]; got shape {tuple(positions.shape)}"
            )
        values = self.setter.values
        if values is not None and tuple(values.shape[: positions.ndim]) != tuple(positions.shape):
            raise ValueError(
                f"Edit {self.hook}: setter values {tuple(values.shape)} must start with the positions' "
                f"shape {tuple(positions.shape)} ([k, *rest] or [clean, k, *rest])"
            )
        if self.pos_dim < 1:
            raise ValueError(f"Edit {self.hook}: pos_dim={self.pos_dim}; axis 0 is the batch")


@dataclass(frozen=True)
class Configuration:
    """One point of a sweep: edits applied together in one forward.

    Attributes:
        label: A short name, e.g. ``"resid L3 dominant zero"``.
        edits: The edits (none: the clean run).
        tags: What the configuration varies, for grouping results (``layer``, ``site``, ...).
    """

    label: str
    edits: tuple[Edit, ...] = ()
    tags: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- readout
@dataclass(frozen=True)
class Readout:
    """What a forward is judged by, at the quality position.

    Attributes:
        level_ids: Token ids of the five level words, best first (`mechbiqa.scoring.level_ids`).
        position: Column of the quality position in the model's (left-padded) output; -1 when
            the prompt ends right before the level word, as Q-Align's scorer prompt does.
        positive: Level word whose logit is the minuend of the logit difference.
        negative: Level word subtracted.
    """

    level_ids: tuple[int, ...]
    position: int = -1
    positive: str = "good"
    negative: str = "poor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_ids", tuple(int(i) for i in self.level_ids))
        if len(self.level_ids) != len(LEVEL_WORDS):
            raise ValueError(
                f"Readout needs the ids of the {len(LEVEL_WORDS)} level words {LEVEL_WORDS}; "
                f"got {len(self.level_ids)}"
            )
        for word in (self.positive, self.negative):
            if word not in LEVEL_WORDS:
                raise ValueError(f"Readout: {word!r} is not a level word {LEVEL_WORDS}")


def read_quality(
    logits: Float[Tensor, "batch vocab"], readout: Readout
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score (Q-Align, 0-1), logit difference, level probabilities and answer from quality-position logits.

    Returns:
        ``score [batch]``, ``logit_diff [batch]``, ``level_probs [batch, level]``, ``answer [batch]``
        (index into `LEVEL_WORDS`).
    """
    ids = torch.tensor(readout.level_ids, device=logits.device)
    level_logits = logits[:, ids].double()  # float64: effects of small edits must not drown in rounding
    probs = level_logits.softmax(-1)
    score = probs @ torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64, device=logits.device)
    i, j = LEVEL_WORDS.index(readout.positive), LEVEL_WORDS.index(readout.negative)
    diff = level_logits[:, i] - level_logits[:, j]
    return (score.cpu().numpy(), diff.cpu().numpy(), probs.cpu().numpy(), probs.argmax(-1).cpu().numpy())


@dataclass(frozen=True)
class SweepResult:
    """The rating under every configuration, for every clean input.

    Attributes:
        labels: ``[config]`` configuration labels.
        tags: ``[config]`` their tags.
        score: ``[config, clean]`` Q-Align score (0-1) with the edits.
        logit_diff: ``[config, clean]`` logit(positive) - logit(negative) with the edits.
        level_probs: ``[config, clean, level]``.
        answer: ``[config, clean]`` argmax level index.
        clean_score: ``[clean]`` score of the unedited run.
        clean_logit_diff: ``[clean]``.
        clean_level_probs: ``[clean, level]``.
        clean_answer: ``[clean]``.
        n_forwards: Forward passes the sweep took (the clean run included).
    """

    labels: tuple[str, ...]
    tags: tuple[Mapping[str, Any], ...]
    score: np.ndarray
    logit_diff: np.ndarray
    level_probs: np.ndarray
    answer: np.ndarray
    clean_score: np.ndarray
    clean_logit_diff: np.ndarray
    clean_level_probs: np.ndarray
    clean_answer: np.ndarray
    n_forwards: int

    @property
    def score_effect(self) -> np.ndarray:
        """``[config, clean]`` edited minus clean score."""
        return self.score - self.clean_score[None]

    @property
    def logit_diff_effect(self) -> np.ndarray:
        """``[config, clean]`` edited minus clean logit difference."""
        return self.logit_diff - self.clean_logit_diff[None]

    @property
    def flipped(self) -> np.ndarray:
        """``[config, clean]`` whether the answer changed."""
        return self.answer != self.clean_answer[None]

    def select(self, **tags: Any) -> np.ndarray:
        """Indices of the configurations whose tags match all of ``tags``."""
        return np.array(
            [i for i, t in enumerate(self.tags) if all(t.get(k) == v for k, v in tags.items())],
            dtype=np.int64,
        )

    def grid(
        self,
        metric: Literal["score_effect", "logit_diff_effect", "flip_rate"],
        rows: Sequence[str],
        column: str = "layer",
    ) -> tuple[list[tuple[Any, ...]], list[Any], np.ndarray]:
        """Mean of a metric over clean inputs, pivoted to ``[row group, column value]``.

        Args:
            metric: ``score_effect``, ``logit_diff_effect`` or ``flip_rate``.
            rows: Tag names that make a row (e.g. ``("site", "selection", "setter")``).
            column: The tag along the columns (``layer``).

        Returns:
            Row keys, column values (sorted), and the ``[row, column]`` array (NaN where absent).
        """
        values = self.flipped.astype(float) if metric == "flip_rate" else getattr(self, metric)
        per_config = values.mean(axis=1)
        keys = sorted({tuple(t.get(r) for r in rows) for t in self.tags}, key=lambda k: tuple(map(str, k)))
        cols = sorted({t.get(column) for t in self.tags}, key=lambda c: (c is None, c))
        out = np.full((len(keys), len(cols)), np.nan)
        for i, tags in enumerate(self.tags):
            out[keys.index(tuple(tags.get(r) for r in rows)), cols.index(tags.get(column))] = per_config[i]
        return keys, cols, out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "labels": list(self.labels),
            "tags": [dict(t) for t in self.tags],
            "score": self.score.tolist(),
            "logit_diff": self.logit_diff.tolist(),
            "answer": self.answer.tolist(),
            "clean_score": self.clean_score.tolist(),
            "clean_logit_diff": self.clean_logit_diff.tolist(),
            "clean_answer": self.clean_answer.tolist(),
            "n_forwards": self.n_forwards,
        }


# ----------------------------------------------------------------------------- the sweep
def _key_axis(edit: Edit) -> bool:
    """Whether an edit indexes the key axis (absolute, cache included) rather than the new positions."""
    return edit.pos_dim == 3 and names.has_key_axis(edit.hook)  # axis 3 spans the cached keys too


def _start(config: Configuration, clean: int) -> tuple[int, int] | None:
    """The (layer, position) before which a row equals the clean run; None if it edits outside the LLM blocks.

    A row whose edits all sit in ``llm.blocks.{l}`` hooks at positions >= p computes, below
    layer ``l`` and before position ``p``, exactly what the clean run computed (causal
    attention: a position never reads later ones).
    """
    if not config.edits:
        return None
    layers, positions = [], []
    for edit in config.edits:
        layer = names.layer_of(edit.hook)
        if layer is None or not edit.hook.startswith(names.block(layer, "")):
            return None
        pos = edit.positions[clean] if edit.positions.ndim == 2 else edit.positions
        layers.append(layer)
        positions.append(int(pos.min()))
    return min(layers), min(positions)


def _row_hooks(
    configurations: Sequence[Configuration], rows: Sequence[tuple[int, int]], shift: int = 0
) -> list[tuple[str, Any]]:
    """One hook per hook name that writes each row's own edits with one indexed assignment.

    Args:
        configurations: The sweep.
        rows: ``(configuration, clean input)`` of each batch row, in order.
        shift: The first position the forward computes (positions along new-position axes are
            moved by it; key axes of attention patterns are absolute).
    """
    # hook -> pos_dim -> lists of (batch rows, positions, values or None for zeros)
    plan: dict[str, dict[int, list[tuple[Tensor, Tensor, Tensor | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for b, (c, i) in enumerate(rows):
        for edit in configurations[c].edits:
            per_clean = edit.positions.ndim == 2
            pos = edit.positions[i] if per_clean else edit.positions
            if not _key_axis(edit):
                pos = pos - shift
            vals = edit.setter.values
            if vals is not None and per_clean:
                vals = vals[i]
            plan[edit.hook][edit.pos_dim].append((torch.full_like(pos, b), pos, vals))

    def make(entries: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]]) -> Any:
        writes = []
        for pos_dim, items in entries.items():
            zero = [(r, p) for r, p, v in items if v is None]
            full = [(r, p, v) for r, p, v in items if v is not None]
            if zero:
                rows, positions = torch.cat([r for r, _ in zero]), torch.cat([p for _, p in zero])
                writes.append((pos_dim, rows, positions, None))
            if full:
                rows, positions = torch.cat([r for r, _, _ in full]), torch.cat([p for _, p, _ in full])
                writes.append((pos_dim, rows, positions, torch.cat([v for _, _, v in full])))
        return patch.scatter_hook(writes)

    return [(name, make(entries)) for name, entries in plan.items()]


def _plan_chunks(
    firsts: Sequence[int], length: int, depth: int, batch_size: int, forward_cost: float
) -> list[tuple[int, int]]:
    """Cut rows sorted by first position into chunks ``[lo, hi)`` of at most ``batch_size`` rows.

    A chunk costs ``forward_cost + rows x (length - firsts[lo]) x depth`` (a forward's fixed cost,
    then one unit per row, position and layer computed); dynamic programming over the cut points
    finds the cheapest plan.
    """
    n = len(firsts)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan of rows [0, j)
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(max(0, hi - max(1, batch_size)), hi):
            cost = best[lo] + forward_cost + (hi - lo) * (length - firsts[lo]) * depth
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    plan, hi = [], n
    while hi > 0:
        plan.append((cut[hi], hi))
        hi = cut[hi]
    return plan[::-1]


# the unembedding's hooks see only the read column when the forward unembeds one column
_UNEMBED = "llm.unembed."


@torch.no_grad()
def sweep(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "clean text_pos"],
    images: Float[Tensor, "clean 3 S S"] | None,
    configurations: Sequence[Configuration],
    readout: Readout,
    *,
    attention_mask: Int[Tensor, "clean text_pos"] | None = None,
    batch_size: int = 64,
    share_prefix: bool = True,
    forward_cost: float | None = None,
) -> SweepResult:
    """Run every configuration on every clean input, stacked along the batch axis.

    Row ``(c, i)`` of the stacked batch is clean input ``i`` with configuration ``c``'s edits.
    Each clean image is encoded once for the whole sweep, and the clean run once. With
    ``share_prefix``, a row whose edits all lie in LLM blocks (layer >= l, position >= p)
    starts from the clean run's state there: layers below ``l`` and positions before ``p``
    are not recomputed, because nothing there can differ (causal attention), and its
    attention reads the clean keys and values of positions before ``p``. Rows that start at
    the same layer run together, at most ``batch_size`` at a time, each chunk from the earliest
    position among its rows (chunks cut where that saves more than ``forward_cost``); rows that
    edit outside the LLM blocks (image tokens, embeddings) run the whole forward. The results equal
    those of a full forward per configuration up to float rounding (tests and
    ``studies/bench_patching.py`` check it).

    Args:
        model: The model (eval mode).
        input_ids: ``[clean, text_pos]`` prompts, one image placeholder each.
        images: ``[clean, 3, S, S]`` their preprocessed images (None for text-only prompts).
        configurations: The sweep.
        readout: Level-word ids and the quality column.
        attention_mask: For padded prompts (positions of edits are then in padded coordinates).
        batch_size: Rows per forward at most.
        share_prefix: Start rows from the clean run's state (else every row runs the whole forward).
        forward_cost: The fixed cost of one forward, in units of one row x position x layer of
            compute. Larger merges rows into fewer forwards, smaller cuts chunks at more start
            positions; the results do not depend on it. None: 128 on a CPU (measured on the
            compact model, ``studies/bench_patching.py``: a forward's overhead is small next to
            its arithmetic) and 1e6 on a GPU (a forward of a few rows is bound by kernel
            launches, so fewer forwards win).

    Returns:
        A `SweepResult`.
    """
    n_clean = input_ids.shape[0]
    if images is not None and images.shape[0] != n_clean:
        raise ValueError(
            f"sweep takes one image per clean prompt; got {images.shape[0]} images for {n_clean} prompts"
        )
    known = set(model.hook_dict)
    for config in configurations:
        for edit in config.edits:
            if edit.hook not in known:
                raise KeyError(
                    f"configuration {config.label!r} edits {edit.hook!r}, which is not a hook of the "
                    "model; build names with mechbiqa_hooks.names"
                )
            if edit.positions.ndim == 2 and edit.positions.shape[0] != n_clean:
                raise ValueError(
                    f"configuration {config.label!r}: per-input positions have "
                    f"{edit.positions.shape[0]} rows for {n_clean} clean inputs"
                )
    device = model.device
    input_ids = input_ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    tokens = None if images is None else model.image_rows(images.to(device, model.dtype))
    clean = model(
        input_ids,
        image_tokens=tokens,
        attention_mask=mask,
        use_cache=True,
        output_hidden_states=True,
        logits_at=readout.position,
    )
    length = clean.attention_mask.shape[1]
    quality = readout.position % length  # absolute column of the quality position

    # rows grouped by where they start: None = the whole forward
    groups: dict[tuple[int, int] | None, list[tuple[int, int]]] = defaultdict(list)
    for c, config in enumerate(configurations):
        for i in range(n_clean):
            start = _start(config, i) if share_prefix else None
            if start is not None:
                start = (start[0], min(start[1], quality))  # an edit after the quality position cannot matter
            groups[start].append((c, i))
    n_rows = len(configurations) * n_clean
    logits: list[Tensor | None] = [None] * n_rows
    n_forwards = 1
    # Rows that start at the same layer run together, each chunk from the earliest position among its
    # rows. Where to cut a layer's rows (sorted by first position) into chunks is a trade-off: one chunk
    # is one forward, but a row recomputes the positions between the chunk's start and its own.
    # `_plan_chunks` picks the cuts that minimise (forwards x forward_cost + recomputed work).
    by_layer: dict[int | None, list[tuple[tuple[int, int] | None, tuple[int, int]]]] = defaultdict(list)
    for start, members in groups.items():
        by_layer[None if start is None else start[0]] += [(start, m) for m in members]
    n_layers = len(model.llm.blocks)
    if forward_cost is None:
        forward_cost = 128.0 if device.type == "cpu" else 1e6
    chunks: list[tuple[tuple[int, int] | None, list[tuple[int, int]]]] = []
    for layer, items in sorted(by_layer.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        if layer is None:
            chunks += [
                (None, [row for _, row in items[i : i + max(1, batch_size)]])
                for i in range(0, len(items), max(1, batch_size))
            ]
            continue
        items.sort(key=lambda item: item[0])  # type: ignore[arg-type, return-value]
        firsts = [st[1] for st, _ in items]  # type: ignore[index]
        for lo, hi in _plan_chunks(firsts, length, n_layers - layer, batch_size, forward_cost):
            chunks.append(((layer, firsts[lo]), [row for _, row in items[lo:hi]]))
    for start, rows in chunks:
        clean_rows = torch.tensor([i for _, i in rows], device=device)
        with model.hooks(fwd_hooks=_row_hooks(configurations, rows, 0 if start is None else start[1])):
            if start is None:
                # an edit of the unembedding's output needs every column of it, not the read one
                whole = any(e.hook.startswith(_UNEMBED) for c, _ in rows for e in configurations[c].edits)
                out = model(
                    input_ids[clean_rows],
                    image_tokens=None if tokens is None else tokens[clean_rows],
                    attention_mask=None if mask is None else mask[clean_rows],
                    logits_at=None if whole else readout.position,
                ).logits
                out = out[:, readout.position] if whole else out[:, 0]
            else:
                out = model.run_from(clean, start[0], start[1], rows=clean_rows, logits_at=quality)[:, 0]
        n_forwards += 1
        for (c, i), row in zip(rows, out, strict=True):
            logits[c * n_clean + i] = row
    clean_read = read_quality(clean.logits[:, 0], readout)
    shape = (len(configurations), n_clean)
    if n_rows:
        score, diff, probs, answer = read_quality(torch.stack(logits), readout)  # type: ignore[arg-type]
    else:
        score, diff, probs, answer = (
            np.zeros((0,)),
            np.zeros((0,)),
            np.zeros((0, len(LEVEL_WORDS))),
            np.zeros((0,), dtype=np.int64),
        )
    return SweepResult(
        labels=tuple(c.label for c in configurations),
        tags=tuple(dict(c.tags) for c in configurations),
        score=score.reshape(shape),
        logit_diff=diff.reshape(shape),
        level_probs=probs.reshape(*shape, len(LEVEL_WORDS)),
        answer=answer.reshape(shape),
        clean_score=clean_read[0],
        clean_logit_diff=clean_read[1],
        clean_level_probs=clean_read[2],
        clean_answer=clean_read[3],
        n_forwards=n_forwards,
    )


@torch.no_grad()
def gather_activations(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "batch text_pos"],
    images: Float[Tensor, "batch 3 S S"] | None,
    hooks: Iterable[str],
    positions: Int[Tensor, "batch k"] | Int[Tensor, " k"],
    *,
    attention_mask: Tensor | None = None,
    pos_dim: int = 1,
) -> dict[str, Float[Tensor, "batch k *rest"]]:
    """Activations of a clean run at some positions, for every hook asked (one forward).

    These are the values a ``"source"`` or ``"mean"`` `Setter` writes: e.g. the residuals at the
    image positions of every image, from which a study takes another image's rows (source) or
    the mean over images (mean).
    """
    positions = torch.as_tensor(positions, dtype=torch.long, device=model.device)
    if positions.ndim == 1:
        positions = positions.expand(input_ids.shape[0], -1)
    rows = torch.arange(input_ids.shape[0], device=model.device)[:, None]
    found: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> None:
        found[hook.name] = activation.movedim(pos_dim, 1)[rows, positions].detach().clone()

    wanted = list(dict.fromkeys(hooks))
    with model.hooks(fwd_hooks=[(h, keep) for h in wanted]):
        model(
            input_ids.to(model.device),
            images=None if images is None else images.to(model.device, model.dtype),
            attention_mask=None if attention_mask is None else attention_mask.to(model.device),
        )
    missing = [h for h in wanted if h not in found]
    if missing:
        raise KeyError(f"hooks {missing} did not fire; check the names (mechbiqa_hooks.names)")
    return found


def image_token_grid(
    image_positions: Int[Tensor, "clean n_image"],
    selections: Mapping[str, Int[Tensor, "clean k"]],
    layers: Sequence[int],
    *,
    sites: Sequence[str] = ("resid",),
    setters: Sequence[SetterKind] = ("zero", "mean", "source"),
    image_acts: Mapping[str, Float[Tensor, "clean n_image *rest"]] | None = None,
    source_of: Int[Tensor, " clean"] | None = None,
) -> list[Configuration]:
    """The sweep of DESIGN.md over image tokens: site x layer x token selection x setter.

    Args:
        image_positions: ``[clean, n_image]`` position of each image token (image index order),
            from the token roles.
        selections: Named sets of image indices per clean input, e.g. ``dominant`` (the top-k
            of `mechbiqa.analysis.attribution`), ``random`` and ``least`` (the controls).
        layers: LLM layers to edit.
        sites: Keys of `SITES` (``resid``, ``kv``).
        setters: ``zero``, ``mean`` (the mean over the clean inputs of the activation at the
            same image index: the tokens keep their typical content, lose this image's) and/or
            ``source`` (the same tokens of another image, ``source_of[i]``).
        image_acts: For ``mean``/``source``: per hook name, the activations at all image positions
            of every clean input (`gather_activations` at ``image_positions``).
        source_of: For ``source``: the clean input each one is patched from.

    Returns:
        Configurations tagged with ``site``, ``layer``, ``selection``, ``setter``.
    """
    if "source" in setters and source_of is None:
        raise ValueError("setter 'source' needs source_of: which clean input to patch each one from")
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise KeyError(f"unknown sites {unknown}; known: {sorted(SITES)}")
    out = []
    for site in sites:
        for layer in layers:
            hooks = [h.replace("{l}", str(layer)) for h in SITES[site]]
            for selection, indices in selections.items():
                indices = torch.as_tensor(indices, dtype=torch.long)
                positions = image_positions.gather(1, indices)
                for kind in setters:
                    edits = []
                    for hook in hooks:
                        if kind == "zero":
                            setter = Setter.zero()
                        else:
                            if image_acts is None or hook not in image_acts:
                                raise KeyError(
                                    f"setter {kind!r} needs the activations of {hook!r} at the image "
                                    "positions (gather_activations)"
                                )
                            acts = image_acts[hook]  # [clean, n_image, *rest]
                            if kind == "mean":
                                base = acts.mean(0, keepdim=True).expand_as(acts)
                            else:
                                base = acts[torch.as_tensor(source_of, dtype=torch.long)]
                            rows = torch.arange(acts.shape[0])[:, None]
                            setter = Setter(kind, base[rows, indices])
                        edits.append(Edit(hook, positions, setter))
                    out.append(
                        Configuration(
                            label=f"{site} L{layer} {selection} {kind}",
                            edits=tuple(edits),
                            tags={"site": site, "layer": int(layer), "selection": selection, "setter": kind},
                        )
                    )
    return out


# ----------------------------------------------------------------------------- the image-token study
@dataclass(frozen=True)
class ImageTokenPatching:
    """The sweep of DESIGN.md over image tokens, and what it was built from.

    Attributes:
        sweep: The `SweepResult` (``[configuration, image]`` arrays).
        selections: Selection name -> ``[image, k]`` image indices.
        source_of: ``[image]`` the image each one was patched from.
        prompts: The prompt each image was rated with.
    """

    sweep: SweepResult
    selections: dict[str, np.ndarray]
    source_of: np.ndarray
    prompts: tuple[EncodedPrompt, ...]


@torch.no_grad()
def patch_image_tokens(
    checkpoint: Checkpoint,
    images: Sequence[Any] | Tensor,
    *,
    k: int = 5,
    layers: Sequence[int] | None = None,
    sites: Sequence[str] = ("resid", "kv"),
    setters: Sequence[SetterKind] = ("zero", "mean", "source"),
    seed: int = 0,
    batch_size: int = 64,
) -> ImageTokenPatching:
    """Rank each image's tokens by the quality position's attention; patch the dominant, random and least.

    Each image is rated on the checkpoint's own scoring prompt (`Checkpoint.rate`: Q-Align's
    scorer prompt for a released one, the canonical prompt after its own description for a
    one-stage one). Its ``k`` most and least attended image tokens (every layer and head, the
    rule of `mechbiqa.analysis.attribution.attribute`) and ``k`` random ones (seeded) are
    edited per site, layer and setter (`image_token_grid`); ``source`` patches each image from
    the one whose clean score differs most. A reference configuration zeroes every image
    token entering layer 0.

    Args:
        checkpoint: A checkpoint whose quality position reads the image (not a two-stage pair).
        images: At least two images (paths, PIL images or pixels).
        k: Image tokens per selection.
        layers: LLM layers to edit (default: all).
        sites: Keys of `SITES`.
        setters: ``zero``, ``mean``, ``source``.
        seed: Seed of the random-token control.
        batch_size: Rows per stacked forward.

    Raises:
        ValueError: A two-stage pair, fewer than two images, or ``k`` outside the image's tokens.
    """
    from mechbiqa.analysis.attribution import attribute

    if not checkpoint.image_at_quality:
        raise ValueError(f"{checkpoint.name} is a two-stage pair: stage 2 reads text only, so no image token "
                         "reaches its quality position; patch the one-stage checkpoint")
    pixels = checkpoint.pixels(images)
    if len(pixels) < 2:
        raise ValueError("patching needs at least 2 images (one is patched from another)")
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    n, n_image, n_layers = len(pixels), model.cfg.n_image_tokens, model.cfg.llm.n_layers
    if not 0 < k <= n_image:
        raise ValueError(f"k={k} must be in 1..{n_image} (the model's image tokens)")
    ratings = checkpoint.rate(pixels, batch_size=batch_size)
    batch = batch_prompts(
        [r.prompt for r in ratings],
        roles=[r.roles for r in ratings],
        pad_id=tokenizer.pad_id,
        n_image_tokens=n_image,
        bos_id=tokenizer.bos_id,
    )
    image_positions = batch.image_positions(0)  # [image, n_image]
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)

    # Rank the image tokens by the quality row of every layer's attention (the attribution study's rule).
    quality = torch.from_numpy(batch.quality)[:, None]
    patterns = [names.pattern(layer) for layer in range(n_layers)]
    rows = gather_activations(
        model, batch.input_ids, pixels, patterns, quality, attention_mask=batch.attention_mask, pos_dim=2
    )
    pattern = torch.stack([rows[names.pattern(layer)][:, 0] for layer in range(n_layers)], 1)
    ranked = attribute(pattern.float().cpu().numpy(), batch.stacked("role"), batch.stacked("image_index"),
                       n_image, k=k)
    rng = np.random.default_rng(seed)
    selections = {
        "dominant": ranked.top,
        "random": np.stack([rng.choice(n_image, k, replace=False) for _ in range(n)]),
        "least": ranked.least,
    }
    readout = Readout(tuple(level_ids(tokenizer)), position=-1)
    clean = sweep(model, batch.input_ids, pixels, [], readout, attention_mask=batch.attention_mask)
    # Research choice: patch each image from the one whose clean score differs most, so the patched
    # tokens carry the most different quality information the model itself perceives (labels may be absent).
    source_of = np.abs(clean.clean_score[:, None] - clean.clean_score[None]).argmax(1)
    hooks = [h.replace("{l}", str(layer)) for site in sites for layer in layers for h in SITES[site]]
    image_acts = ({} if set(setters) == {"zero"} else
                  gather_activations(model, batch.input_ids, pixels, hooks, image_positions,
                                     attention_mask=batch.attention_mask))
    configurations = image_token_grid(
        image_positions,
        {s: torch.from_numpy(v) for s, v in selections.items()},
        layers,
        sites=sites,
        setters=setters,
        image_acts=image_acts,
        source_of=torch.from_numpy(source_of),
    )
    configurations.append(Configuration(  # reference: the whole image removed before the first layer
        "resid L0 all zero", (Edit(names.resid_pre(0), image_positions, Setter.zero()),),
        {"site": "resid", "layer": 0, "selection": "all", "setter": "zero"},
    ))  # fmt: skip
    result = sweep(
        model,
        batch.input_ids,
        pixels,
        configurations,
        readout,
        attention_mask=batch.attention_mask,
        batch_size=batch_size,
    )
    return ImageTokenPatching(sweep=result, selections=selections, source_of=source_of,
                              prompts=tuple(r.prompt for r in ratings))
