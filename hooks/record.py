"""Recorders: stream the activations a `CacheSpec` names into an activation store while the model runs.

Where it sits: `mechbiqa.model.MPLUGOwl2` exposes TransformerLens `HookPoint`s
(names in `mechbiqa_hooks.names`); `Recorder` attaches one small hook per
(site, layer) through ``model.hooks(...)`` (removed in a ``finally``), and each
hook keeps only the selected rows of its tensor (the quality row, the image
tokens ...). `record_dataset` drives a whole run: prompt, batches, images,
forward or generation, then `mechbiqa.store.StoreWriter.write` once per batch,
so memory stays flat in the number of samples. `studies/cache_activations.py`
is its command line; `mechbiqa.store.ActivationStore` reads the result.

Two modes of `record_dataset`, where every sample is asked one shared prompt:

* ``score``: one prompted forward per batch on a prompt that ends right before
  the level word (Q-Align's scorer prompt by default); the quality position is
  the last prompt token.
* ``generate``: the model writes its answer with the KV cache (no hooks: the
  decode steps are not recorded), the quality position is found in the answer
  (`mechbiqa.model.prompts.find_quality_index`: the position before the last
  level word), then prompt + whole answer run once more, as one teacher-forced
  forward, with recording on. Research choice: the second forward costs one
  prefill per batch but gives every position of the answer (description,
  quality) from a single pass, identical in maths to what decoding computed;
  recording inside the decode loop would need the quality position before it
  is known.

`record_prompts` records samples that each carry their own scoring prompt
(`PromptedSample`): prompts of any length, with one image or none (the
text-only stage-2 prompt of a two-stage pair records zero image tokens), and
their own token roles (e.g. `mechbiqa.pipeline.Rating.roles`, where the
description in a stage-2 user turn has the ``description`` role). The store's
shapes are planned from the longest prompt and the largest count of each role
over all samples; a digest of every prompt and its roles joins the identity a
resumed run must match. `mechbiqa.analysis.capture.record_rater` builds the
prompts from a rater (`mechbiqa.pipeline`) and calls it.

Positions are stored in unpadded sequence coordinates (0 = BOS): the
recorder undoes the model's left padding, for the position axis and for the
key axis of attention rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.config import IMAGE_TOKEN_INDEX, ModelConfig
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageLoadError, ImageProcessor
from mechbiqa.model.prompts import (
    LEVEL_WORDS,
    QALIGN_ANSWER_PREFIX,
    QALIGN_QUESTION,
    EncodedPrompt,
    encode_prompt,
    find_quality_index,
    get_template,
)
from mechbiqa.model.roles import Role, TokenRoles, assign_roles
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.store import (
    ERROR_BYTES,
    STATUS_FAILED,
    STATUS_OK,
    ArraySpec,
    BatchRows,
    CacheSpec,
    SampleInfo,
    StoreLayout,
    StoreWriter,
    encode_text,
    is_image_space,
)

__all__ = [
    "PromptConfig",
    "PromptedSample",
    "RecordResult",
    "Recorder",
    "RunConfig",
    "SampleSource",
    "model_identity",
    "plan_layout",
    "record_dataset",
    "record_prompts",
    "tokenizer_identity",
]

_PAD_ID = -1  # spliced-space id stored at padding positions


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True, slots=True)
class PromptConfig:
    r"""The prompt every sample is asked (`mechbiqa.model.prompts.encode_prompt`).

    The default renders Q-Align's scorer prompt exactly
    (``"USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT:
    The quality of the image is"``, one line).

    Attributes:
        template: A conversation template name (``qalign_scorer``, ``mplug_owl2``, ``v1`` ...).
        question: The user's question, without image tag.
        image_first: Put the image before the question (Q-Instruct) or after it (Q-Align).
        image_sep: Text between image tag and question.
        answer_prefix: In ``score`` mode, the answer text that leads to the level word
            (ignored when generating: the model writes the whole answer).
    """

    template: str = "qalign_scorer"
    question: str = QALIGN_QUESTION
    image_first: bool = False
    image_sep: str = "\n"
    answer_prefix: str = QALIGN_ANSWER_PREFIX

    def encode(self, tokenizer: Tokenizer, mode: Literal["score", "generate"]) -> EncodedPrompt:
        """Tokenize for a mode (``generate`` leaves the answer open)."""
        score = mode == "score"
        return encode_prompt(
            tokenizer,
            get_template(self.template),
            self.question,
            image_first=self.image_first,
            image_sep=self.image_sep,
            answer_prefix=self.answer_prefix if score else "",
            scores_quality=score,
        )


@dataclass(frozen=True, slots=True)
class RunConfig:
    """How a recording run proceeds. All of it must match when a run is resumed.

    Attributes:
        mode: ``"score"`` (one prompted forward) or ``"generate"`` (answer, then a recorded forward).
        batch_size: Samples per batch (also the commit unit of the store).
        max_new_tokens: Longest generated answer (``generate``).
        do_sample: Sample instead of greedy decoding (``generate``).
        temperature: Sampling temperature.
        top_k: Keep the k most likely tokens when sampling.
        top_p: Nucleus sampling threshold.
        seed: Seeds each batch's sampler from (seed, first sample of the batch), so a
            resumed run draws exactly what an uninterrupted one would.
    """

    mode: Literal["score", "generate"] = "score"
    batch_size: int = 8
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("score", "generate"):
            raise ValueError(f"RunConfig mode must be 'score' or 'generate'; got {self.mode!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1; got {self.batch_size}, {self.max_new_tokens}"
            )


@dataclass(frozen=True, slots=True)
class SampleSource:
    """One image to record (an `IQARecord` works too: anything with ``id`` and ``image_path``).

    Attributes:
        id: Unique id.
        image_path: The image file.
        label: The 0-1 rating, or None.
        record: Extra fields stored as JSON with the sample.
    """

    id: str
    image_path: str | Path
    label: float | None = None
    record: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PromptedSample:
    """One sample with its own prompt (`record_prompts`).

    Attributes:
        id: Unique id.
        prompt: The text-space prompt, with one image placeholder or none; for a scoring prompt
            ``prompt.quality_index`` is its last id (the position whose logits choose the level word).
        image_path: The image. Loaded only when the prompt has a placeholder; for a text-only
            prompt it is provenance (the image a stage-1 model described), or None.
        roles: Spliced token roles of the prompt; None: `assign_roles` from ``prompt``'s indices.
        label: The 0-1 rating, or None.
        record: Extra fields stored as JSON with the sample (the rating, the description ...).
        answer: Generated text kept in ``samples/answer`` (e.g. the description).
        error: Why the sample has no prompt (e.g. its image could not be read to rate it): it is
            stored as a failed sample with this reason (``ActivationStore.errors``); ``prompt`` is None.
    """

    id: str
    prompt: EncodedPrompt | None
    image_path: str | Path | None = None
    roles: TokenRoles | None = None
    label: float | None = None
    record: Mapping[str, Any] | None = None
    answer: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        """A sample has a prompt, or an error saying why not."""
        if (self.prompt is None) == (not self.error):
            raise ValueError(
                f"PromptedSample {self.id!r}: give a prompt, or prompt=None with the error that explains why"
            )


# ----------------------------------------------------------------------------- identity
def model_identity(model: MPLUGOwl2) -> dict[str, Any]:
    """A fingerprint of the weights: name, shape, dtype and a strided sample of every tensor.

    Cheap even at 7B (a few thousand values per tensor), and it tells two
    checkpoints of the same architecture apart. Resuming a store needs it equal.
    """
    sha = hashlib.sha256()
    n_params = 0
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            n_params += flat.numel()
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float32).numpy()
            sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            sha.update(sample.tobytes())
    return {
        "fingerprint": sha.hexdigest()[:32],
        "dtype": str(model.dtype).removeprefix("torch."),
        "n_params": n_params,
    }


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """Kind, vocabulary size and a hash of every piece."""
    sha = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        sha.update(tokenizer.id_to_piece(i).encode("utf-8", errors="replace") + b"\x00")
    return {
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": sha.hexdigest()[:32],
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def environment(model: MPLUGOwl2) -> dict[str, Any]:
    """What decides float rounding besides the inputs: torch, threads, device (provenance, not identity)."""
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": name}


# ----------------------------------------------------------------------------- layout
def _layers_of(cfg: ModelConfig, hook: str) -> int:
    tower = hook.split(".")[0]
    return {"vision": cfg.vision.n_layers, "abstractor": cfg.abstractor.n_layers}.get(tower, cfg.llm.n_layers)


def _text_feature(
    cfg: ModelConfig, hook: str, cap: int, max_pos: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Per-sample shape of an LLM hook with ``cap`` selected positions."""
    llm = cfg.llm
    last = hook.rsplit(".", 1)[-1]
    if hook.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        return (llm.n_heads, cap, max_pos), ("head", "pos", "key_pos")
    if hook.endswith(("attn.hook_q", "attn.hook_z")):
        return (cap, llm.n_heads, llm.d_head), ("pos", "head", "d_head")
    if hook.endswith(("attn.hook_k", "attn.hook_v")):
        return (cap, llm.n_kv_heads, llm.d_head), ("pos", "kv_head", "d_head")
    if hook.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return (cap, llm.d_mlp), ("pos", "d_mlp")
    if last == "hook_scale":
        return (cap, 1), ("pos", "one")
    if hook == "llm.unembed.hook_out":
        return (cap, llm.vocab_size), ("pos", "vocab")
    if hook == "llm.hook_modality":
        return (cap,), ("pos",)
    if last in (
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "hook_normalized",
    ):
        return (cap, llm.d_model), ("pos", "d_model")
    raise ValueError(
        f"cannot cache hook {hook!r}: not an LLM hook with a position axis that the recorder knows; "
        "see mechbiqa_hooks.names for the hook names"
    )


def _image_features(model: MPLUGOwl2, hooks: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of image-side hooks, found by encoding one blank image."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(tensor: Tensor, hook: Any) -> None:
        shapes[hook.name] = tuple(tensor.shape[1:])

    names = sorted({h.replace("{l}", "0") for h in hooks})
    size = model.cfg.vision.image_size
    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, grab) for n in names]):
        model.encode_images(torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype))
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(
            f"image-side hook(s) {missing} did not fire while encoding an image; check the names"
        )
    return {h: shapes[h.replace("{l}", "0")] for h in hooks}


def capacities(prompt_roles: TokenRoles | Sequence[TokenRoles], run: RunConfig) -> dict[str, int]:
    """Positions each selection may hold, from the prompts' roles and the longest answer.

    With several prompts (one per sample) each role gets the largest count any prompt has.
    """
    many = [prompt_roles] if isinstance(prompt_roles, TokenRoles) else list(prompt_roles)
    if not many:
        raise ValueError("capacities needs the roles of at least one prompt")
    per_prompt = [r.counts() for r in many]
    counts = {label: max(c[label] for c in per_prompt) for label in per_prompt[0]}
    grow = run.max_new_tokens if run.mode == "generate" else 0
    max_pos = max(len(r) for r in many) + grow
    cap = {"all": max_pos, "last": 1, "quality": 1, "bos": 1}
    for role in Role:
        label = role.label
        if label in ("pad", "quality", "bos"):
            continue
        cap[label] = counts[label] + (grow if role in (Role.DESCRIPTION, Role.OTHER) else 0)
    return {k: max(1, v) for k, v in cap.items()}


def plan_layout(
    model: MPLUGOwl2,
    spec: CacheSpec,
    prompt_roles: TokenRoles | Sequence[TokenRoles],
    n_samples: int,
    run: RunConfig = RunConfig(),
) -> StoreLayout:
    """Resolve a spec against a model and prompt: every array's shape, fixed before the run starts.

    Args:
        model: The model (its config gives widths and layer counts).
        spec: What to cache.
        prompt_roles: Roles of the prompt's spliced sequence, or of every sample's own prompt.
        n_samples: Rows of the store.
        run: The run (generation lengthens sequences by ``max_new_tokens``).
    """
    cfg = model.cfg
    cap = capacities(prompt_roles, run)
    max_pos = cap["all"]
    image_hooks = [s.hook for s in spec.sites if is_image_space(s.hook)]
    image_shapes = _image_features(model, image_hooks) if image_hooks else {}
    arrays = []
    for site in spec.sites:
        if site.has_layers:
            n_layers = _layers_of(cfg, site.hook)
            layers = site.layers if site.layers is not None else tuple(range(n_layers))
            bad = [x for x in layers if x >= n_layers]
            if bad:
                raise ValueError(f"{site}: layer(s) {bad} do not exist; the model has {n_layers}")
        else:
            layers = ()
        if is_image_space(site.hook):
            shape = image_shapes[site.hook]
            dims = ("head", "query", "key") if len(shape) == 3 else ("token", "d")
        else:
            shape, dims = _text_feature(cfg, site.hook, cap[site.select], max_pos)
        arrays.append(ArraySpec(site.key, site.hook, site.select, layers, shape, dims))
    used = {s.select for s in spec.sites} | {"quality", "image"}
    answer_bytes = 1 if run.mode == "score" else 24 * run.max_new_tokens
    return StoreLayout(
        n_samples,
        max_pos,
        tuple((s, cap[s]) for s in sorted(used)),
        tuple(arrays),
        answer_bytes=answer_bytes,
        dtype=spec.dtype,
    )


# ----------------------------------------------------------------------------- recorder
@dataclass
class _Rows:
    """The batch as the recording forward sees it (only samples whose image loaded)."""

    input_ids: Tensor  # [batch, text_pos] left-padded
    attention_mask: Tensor  # [batch, text_pos]
    roles: list[TokenRoles]  # per row, unpadded
    text_ids: list[list[int]]  # per row, text-space ids


@dataclass
class _BatchState:
    """Per-batch index tensors the hooks read (set by `Recorder.record`, None between batches)."""

    arange: Tensor  # [batch]
    index: dict[str, Tensor]  # select -> [batch, cap] columns in the padded batch
    valid: dict[str, Tensor]  # select -> [batch, cap] bool
    all_valid: dict[str, bool]  # select -> every entry valid (no masking needed)
    key_index: Tensor  # [batch, key] padded column of each unpadded key
    key_valid: Tensor  # [batch, key] bool
    captured: dict[str, list[Tensor | None]]  # key -> one tensor per layer slot
    image_rows: Tensor | None = None  # [image] row of each image when not every row has one


class Recorder:
    """Hooks that keep the selected rows of each site during a forward.

    Build once per run from the layout; `record` runs one batch and returns
    ``{key: [layer, batch, *shape]}`` numpy arrays. The hooks are attached
    through TransformerLens' ``hooks()`` context (removed in a ``finally``):
    per call of `record`, or once for a whole run with ``with recorder.attached():``
    (cheaper: no attach/detach per batch). Between `record` calls the hooks do
    nothing (generation runs inside the same context unrecorded), and nothing is
    kept from one batch to the next.
    """

    def __init__(self, model: MPLUGOwl2, layout: StoreLayout) -> None:  # noqa: D107
        self.model = model
        self.layout = layout
        self.torch_dtype = getattr(torch, layout.dtype)
        self._state: _BatchState | None = None
        self._attached = False
        self._hooks: list[tuple[str, Callable]] = []
        for spec in layout.arrays:
            for slot, layer in enumerate(spec.layers or (None,)):
                name = spec.hook if layer is None else spec.hook.replace("{l}", str(layer))
                self._hooks.append((name, self._hook(spec, slot)))

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        """Keep the hooks attached for several `record` calls."""
        if self._attached:
            yield self
            return
        with self.model.hooks(fwd_hooks=self._hooks):
            self._attached = True
            try:
                yield self
            finally:
                self._attached = False

    def selections(self, roles: Sequence[TokenRoles]) -> dict[str, np.ndarray]:
        """``{select: [batch, capacity]}`` unpadded positions (-1 where unused)."""
        out = {}
        for select, cap in self.layout.capacities:
            table = np.full((len(roles), cap), -1, dtype=np.int32)
            for b, r in enumerate(roles):
                if select == "all":
                    pos = np.arange(len(r))
                elif select == "last":
                    pos = np.array([len(r) - 1])
                else:
                    pos = r.positions(Role[select.upper()])
                if len(pos) > cap:
                    raise ValueError(
                        f"selection {select!r} has {len(pos)} positions in a sample but room for {cap}; "
                        "is the prompt the one the store was planned with?"
                    )
                table[b, : len(pos)] = pos
            out[select] = table
        return out

    def record(
        self,
        rows: _Rows,
        pixels: Tensor | None,
        selections: dict[str, np.ndarray] | None = None,
        image_rows: Sequence[int] | None = None,
    ) -> tuple[dict[str, np.ndarray], Tensor]:
        """Run one recorded forward.

        Args:
            rows: The batch (left-padded ids, mask, roles of each row).
            pixels: ``[image, 3, S, S]`` images in placeholder order: one per row, or one per
                row of ``image_rows``; None when no row has an image.
            selections: `selections` of ``rows.roles`` when the caller has them already.
            image_rows: The rows that hold an image, when not all do (text-only rows get zeros
                in image-side arrays).

        Returns:
            ``({key: [layer, batch, *shape]}, logits [batch, pos, vocab])``.
        """
        model, layout = self.model, self.layout
        device = model.device
        lengths = torch.tensor([len(r) for r in rows.roles], device=device)
        length = int(lengths.max())
        if length > layout.max_pos:
            raise ValueError(f"a sequence of {length} positions exceeds the store's max_pos {layout.max_pos}")
        pad = length - lengths  # [batch] left padding of each spliced row
        index, valid, all_valid = {}, {}, {}
        for select, table in (selections if selections is not None else self.selections(rows.roles)).items():
            t = torch.from_numpy(table).to(device).long()
            valid[select] = t >= 0  # [batch, cap]
            all_valid[select] = bool((table >= 0).all())
            index[select] = (t.clamp(min=0) + pad[:, None]).clamp(
                max=length - 1
            )  # columns in the padded batch
        self._state = _BatchState(
            arange=torch.arange(len(rows.roles), device=device),
            index=index,
            valid=valid,
            all_valid=all_valid,
            key_index=(pad[:, None] + torch.arange(length, device=device)).clamp(max=length - 1),
            key_valid=torch.arange(length, device=device)[None, :] < lengths[:, None],
            captured={a.key: [None] * a.n_layer_slots for a in layout.arrays},
            image_rows=None
            if image_rows is None
            else torch.as_tensor(list(image_rows), device=device).long(),
        )
        images = None if pixels is None or not len(pixels) else pixels.to(device, model.dtype)
        try:
            with torch.inference_mode(), self.attached():
                out = model(
                    rows.input_ids.to(device), images=images, attention_mask=rows.attention_mask.to(device)
                )
            captured = self._state.captured
        finally:
            self._state = None
        if images is None:  # no image in the batch: the image-side hooks had nothing to see
            for a in layout.arrays:
                if is_image_space(a.hook):
                    empty = torch.zeros((len(rows.roles), *a.shape), dtype=self.torch_dtype)
                    captured[a.key] = [empty] * a.n_layer_slots
        missing = [k for k, v in captured.items() if any(x is None for x in v)]
        if missing:
            raise RuntimeError(f"hooks for {missing} did not fire; are the hook names right for this model?")
        arrays = {k: torch.stack(v).cpu().numpy() for k, v in captured.items()}  # type: ignore[arg-type]
        return arrays, out.logits

    def _hook(self, spec: ArraySpec, slot: int) -> Callable:
        dtype, max_pos, key, select = self.torch_dtype, self.layout.max_pos, spec.key, spec.select
        if is_image_space(spec.hook):

            def keep_image(x: Tensor, hook: Any) -> None:
                state = self._state
                if state is None:
                    return
                x = x.detach().to(dtype)
                if state.image_rows is not None:  # text-only rows keep zeros
                    out = torch.zeros((len(state.arange), *x.shape[1:]), dtype=dtype, device=x.device)
                    out[state.image_rows] = x
                    x = out
                state.captured[key][slot] = x

            return keep_image
        if spec.dims[:1] == ("head",):  # attention pattern / scores [batch, head, q, k]

            def keep_rows(x: Tensor, hook: Any) -> None:
                state = self._state
                if state is None:
                    return
                rows = x[state.arange[:, None], :, state.index[select]].transpose(
                    1, 2
                )  # [batch, head, cap, key]
                b, h, c, k = rows.shape
                rows = torch.gather(
                    rows, 3, state.key_index[:, None, None, :].expand(b, h, c, k)
                )  # unpad keys
                keep = state.valid[select][:, None, :, None] & state.key_valid[:, None, None, :]
                out = torch.zeros(b, h, c, max_pos, dtype=dtype, device=x.device)
                out[..., :k] = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=x.device))
                state.captured[key][slot] = out

            return keep_rows

        def keep_positions(x: Tensor, hook: Any) -> None:
            state = self._state
            if state is None:
                return
            sel = x[state.arange[:, None], state.index[select]].to(dtype)  # [batch, cap, *feature]
            if not state.all_valid[select]:
                ok = state.valid[select]
                sel = torch.where(
                    ok.view(*ok.shape, *([1] * (sel.ndim - 2))),
                    sel,
                    torch.zeros((), dtype=sel.dtype, device=x.device),
                )
            state.captured[key][slot] = sel

        return keep_positions


# ----------------------------------------------------------------------------- driver
@dataclass(frozen=True, slots=True)
class RecordResult:
    """What a run did.

    Attributes:
        path: The finished store.
        n_samples: Rows in the store.
        n_recorded: Samples recorded by this call (0 when the store was already complete).
        n_failed: Failed samples in the store (see `ActivationStore.errors`).
        resumed_from: The first sample this call recorded (0 for a fresh run).
        seconds: Wall time of this call.
    """

    path: Path
    n_samples: int
    n_recorded: int
    n_failed: int
    resumed_from: int
    seconds: float


def _batch_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, start]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _sample_info(source: Any, prompt_text: str) -> SampleInfo:
    record: dict[str, Any] = {}
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        record = to_dict()
    elif getattr(source, "record", None):
        record = dict(source.record)
    label = getattr(source, "label", None)
    if label is None:
        label = getattr(source, "mos01", None)
    return SampleInfo(
        id=str(source.id),
        image_path=str(source.image_path),
        prompt=prompt_text,
        label=None if label is None else float(label),
        record=record,
    )


def _spliced_ids(text_ids: Sequence[int], roles: TokenRoles) -> np.ndarray:
    ids = np.asarray(text_ids, dtype=np.int64)[roles.source_index]
    ids[roles.role == Role.IMAGE] = IMAGE_TOKEN_INDEX
    return ids


def record_dataset(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    samples: Sequence[Any],
    spec: CacheSpec,
    path: str | Path,
    *,
    prompt: PromptConfig = PromptConfig(),
    run: RunConfig = RunConfig(),
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
) -> RecordResult:
    """Record a data set into a store; resume it if it was interrupted.

    Args:
        model: The model (eval mode, on its device and dtype).
        tokenizer: Its tokenizer.
        processor: Its image processor.
        samples: `IQARecord`s or `SampleSource`s (``id``, ``image_path``, optionally a label).
        spec: What to cache.
        path: The store file (``cache/<name>.h5``); ``<path>.partial`` while unfinished.
        prompt: The prompt.
        run: Mode, batch size, sampling.
        model_name: Where the model came from (stored, not compared on resume).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        overwrite: Start again even if a store exists.
        fsync: Flush each batch to disk before committing it (power-loss safety).
        progress: Called with ``(samples done, total)`` after each batch.
        load_image: ``sample -> [3, S, S]`` pixels, instead of ``processor.preprocess(sample.image_path)``
            (images already in memory; benchmarks). It may raise `ImageLoadError` for a bad sample.

    Returns:
        A `RecordResult`.

    Raises:
        mechbiqa.store.StoreLockedError: Another process writes the store.
        mechbiqa.store.StoreMismatchError: The existing store was recorded differently.
    """
    began = time.perf_counter()
    encoded = prompt.encode(tokenizer, run.mode)
    if encoded.n_images != 1:
        raise ValueError(f"the recorder expects one image per prompt; the prompt has {encoded.n_images}")
    n_image_tokens = model.cfg.n_image_tokens
    prompt_roles = assign_roles(
        encoded.ids,
        response_start=encoded.response_start,
        quality_index=encoded.quality_index,
        n_image_tokens=n_image_tokens,
        bos_id=tokenizer.bos_id,
    )
    layout = plan_layout(model, spec, prompt_roles, len(samples), run)
    run_dict = asdict(run) | ({"shard": dict(shard)} if shard else {})
    attrs = _store_attrs(
        model, tokenizer, model_name, spec, run_dict,
        asdict(prompt) | {"text": encoded.text, "ids": list(encoded.ids), "image_processor": asdict(processor)},
    )  # fmt: skip
    infos = [_sample_info(s, encoded.text) for s in samples]
    load = load_image or (lambda sample: torch.from_numpy(processor.preprocess(Path(sample.image_path))))
    level_ids = [tokenizer.word_id(w) for w in LEVEL_WORDS]
    role_cache: dict[tuple[int, ...], tuple[TokenRoles, np.ndarray]] = {}

    def record_batch(recorder: Recorder, start: int, stop: int) -> Any:
        return _record_batch(model, tokenizer, load, recorder, samples[start:stop], start, encoded, run, level_ids,
                             layout, role_cache)  # fmt: skip

    return _write_store(model, path, layout, attrs, infos, run.batch_size, record_batch,
                        overwrite=overwrite, fsync=fsync, progress=progress, began=began)  # fmt: skip


def prompted_roles(sample: PromptedSample, n_image_tokens: int, bos_id: int) -> TokenRoles | None:
    """The spliced roles of a `PromptedSample` (its own, or `assign_roles` of its prompt), checked.

    Returns None for a sample without a prompt (an error row).

    Raises:
        ValueError: The prompt holds more than one image, or the roles do not fit the prompt.
    """
    prompt = sample.prompt
    if prompt is None:
        return None
    if prompt.n_images > 1:
        raise ValueError(
            f"sample {sample.id!r}: its prompt holds {prompt.n_images} images; record_prompts takes "
            "one image per prompt, or none (text only)"
        )
    roles = sample.roles
    if roles is None:
        roles = assign_roles(
            prompt.ids,
            response_start=prompt.response_start,
            quality_index=prompt.quality_index,
            n_image_tokens=n_image_tokens,
            bos_id=bos_id,
        )
    spliced = len(prompt.ids) + prompt.n_images * (n_image_tokens - 1)
    if len(roles) != spliced or roles.n_images != prompt.n_images:
        raise ValueError(
            f"sample {sample.id!r}: {len(roles)} roles with {roles.n_images} image(s) for a prompt of "
            f"{spliced} spliced positions with {prompt.n_images}; pass the roles of this prompt "
            f"({n_image_tokens} tokens per image), or none"
        )
    return roles


def prompts_digest(samples: Sequence[PromptedSample], roles: Sequence[TokenRoles | None]) -> str:
    """SHA-256 over every sample's prompt ids and roles: what a resumed `record_prompts` must match."""
    sha = hashlib.sha256()
    for sample, r in zip(samples, roles, strict=True):
        if sample.prompt is None or r is None:
            sha.update(b"error:" + sample.error.encode("utf-8") + b"\x00")
            continue
        sha.update(np.asarray(sample.prompt.ids, dtype="<i8").tobytes() + b"|")
        sha.update(np.asarray(r.role, dtype="i1").tobytes() + b"|")
        sha.update(np.asarray(r.image_index, dtype="<i2").tobytes() + b"\x00")
    return sha.hexdigest()


def record_prompts(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor | None,
    samples: Sequence[PromptedSample],
    spec: CacheSpec,
    path: str | Path,
    *,
    batch_size: int = 8,
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
) -> RecordResult:
    """Record samples that each carry their own prompt; resume the store if it was interrupted.

    One teacher-forced forward per batch over the given prompts (nothing is generated): a
    one-stage model's scoring prompt (image, its own description, "The quality of the image
    is"), or a two-stage pair's text-only stage-2 prompt (zero image tokens; the image-side
    arrays of such a sample are zero and ``samples/n_images`` is 0). Batches may mix both.

    Args:
        model: The model whose prompts these are.
        tokenizer: Its tokenizer (pad id, identity).
        processor: Its image processor; None when no prompt holds an image (or with ``load_image``).
        samples: One `PromptedSample` per row.
        spec: What to cache (positions by role: ``quality`` is each prompt's own quality position).
        path: The store file.
        batch_size: Samples per batch (the commit unit).
        model_name: Where the model came from (a checkpoint directory: studies read the lens from it).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        overwrite: Start again even if a store exists.
        fsync: Flush each batch to disk before committing it.
        progress: Called with ``(samples done, total)`` after each batch.
        load_image: ``sample -> [3, S, S]`` pixels instead of ``processor.preprocess(sample.image_path)``.

    Returns:
        A `RecordResult`.

    Raises:
        ValueError: A prompt with several images, roles that do not fit their prompt, or an image
            prompt without an image to load (each named by sample id).
        mechbiqa.store.StoreMismatchError: The existing store holds other prompts or another model.
    """
    began = time.perf_counter()
    if not samples:
        raise ValueError("record_prompts got no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n_image_tokens = model.cfg.n_image_tokens
    roles = [prompted_roles(s, n_image_tokens, tokenizer.bos_id) for s in samples]
    known = [r for r in roles if r is not None]
    if not known:
        raise ValueError(f"none of the {len(samples)} samples has a prompt; first error: {samples[0].error}")
    with_image = [s for s in samples if s.prompt is not None and s.prompt.n_images]
    if with_image and load_image is None:
        if processor is None:
            raise ValueError(
                f"sample {with_image[0].id!r} has an image in its prompt, but no processor "
                "(or load_image) was given"
            )
        lost = [s.id for s in with_image if s.image_path is None]
        if lost:
            raise ValueError(f"samples {lost[:5]} have an image in their prompt but no image_path")
    run = RunConfig(mode="score", batch_size=batch_size)
    layout = plan_layout(model, spec, known, len(samples), run)
    answer_bytes = max([len(s.answer.encode("utf-8")) for s in samples] + [1])
    layout = StoreLayout(
        layout.n_samples, layout.max_pos, layout.capacities, layout.arrays, answer_bytes, layout.dtype
    )
    run_dict = {"mode": "prompts", "batch_size": batch_size} | ({"shard": dict(shard)} if shard else {})
    attrs = _store_attrs(
        model, tokenizer, model_name, spec, run_dict,
        {"per_sample": True, "digest": prompts_digest(samples, roles), "n_text_only": len(known) - len(with_image),
         "image_processor": None if processor is None else asdict(processor)},
    )  # fmt: skip
    infos = [
        SampleInfo(
            id=str(s.id),
            image_path="" if s.image_path is None else str(s.image_path),
            prompt="" if s.prompt is None else s.prompt.text,
            label=None if s.label is None else float(s.label),
            record=dict(s.record or {}),
        )
        for s in samples
    ]
    def load_from_path(sample: PromptedSample) -> Tensor:
        return torch.from_numpy(processor.preprocess(Path(sample.image_path)))  # type: ignore[union-attr]

    load = load_image or load_from_path

    def record_batch(recorder: Recorder, lo: int, hi: int) -> Any:
        return _record_prompt_batch(tokenizer, load, recorder, samples[lo:hi], roles[lo:hi], lo, layout)

    return _write_store(model, path, layout, attrs, infos, batch_size, record_batch,
                        overwrite=overwrite, fsync=fsync, progress=progress, began=began)  # fmt: skip


def _store_attrs(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    model_name: str,
    spec: CacheSpec,
    run: dict[str, Any],
    prompt: dict[str, Any],
) -> dict[str, str]:
    """The store's provenance attributes (compared on resume; ``model`` and ``environment`` are not)."""
    return {
        "model": model_name,
        "model_config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "model_identity": json.dumps(model_identity(model), sort_keys=True),
        "tokenizer": json.dumps(tokenizer_identity(tokenizer), sort_keys=True),
        "prompt": json.dumps(prompt, sort_keys=True),
        "run": json.dumps(run, sort_keys=True),
        "cache_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "environment": json.dumps(environment(model), sort_keys=True),
    }


def _write_store(
    model: MPLUGOwl2,
    path: str | Path,
    layout: StoreLayout,
    attrs: dict[str, str],
    infos: list[SampleInfo],
    batch_size: int,
    record_batch: Callable[[Recorder, int, int], Any],
    *,
    overwrite: bool,
    fsync: bool,
    progress: Callable[[int, int], None] | None,
    began: float,
) -> RecordResult:
    """Open (or resume) the store and write ``record_batch(recorder, lo, hi)`` for every pending batch."""
    writer = StoreWriter.open(path, layout, attrs, infos, overwrite=overwrite, fsync=fsync)
    _warn_environment(writer, attrs, path)
    recorder = Recorder(model, layout)
    n = len(infos)
    try:
        batches = list(iter_batches(n, batch_size, writer.first_pending)) if not writer.complete else []
        resumed_from = batches[0][0] if batches else n
        if progress is not None:
            progress(resumed_from, n)
        recorded = 0
        with recorder.attached():
            for lo, hi in batches:
                writer.write(record_batch(recorder, lo, hi))
                recorded += hi - lo
                if progress is not None:
                    progress(hi, n)
        failed = int((writer.status == STATUS_FAILED).sum())
        final = writer.finish()
    finally:
        writer.close()
    return RecordResult(Path(final), n, recorded, failed, resumed_from, time.perf_counter() - began)


def _load_pixels(
    load: Callable[[Any], Tensor], chunk: Sequence[Any], needs_image: Sequence[bool] | None = None
) -> tuple[np.ndarray, list[str], list[Tensor]]:
    """Load the images of a batch: status and error per sample, pixels of the loaded ones in order.

    Samples that need no image (``needs_image`` False) count as loaded without being read.
    """
    n = len(chunk)
    status = np.full(n, STATUS_OK, dtype=np.int8)
    errors = [""] * n
    pixels = []
    for i, sample in enumerate(chunk):
        if needs_image is not None and not needs_image[i]:
            continue
        try:
            pixels.append(load(sample))
        except ImageLoadError as error:
            status[i], errors[i] = STATUS_FAILED, error.reason
        except (OSError, ValueError) as error:  # anything else PIL raises on a bad file
            status[i], errors[i] = STATUS_FAILED, f"{type(error).__name__}: {error}"
    return status, errors, pixels


def _record_rows(
    tokenizer: Tokenizer,
    recorder: Recorder,
    layout: StoreLayout,
    n: int,
    ok: Sequence[int],
    text_ids: Sequence[Sequence[int]],
    roles: Sequence[TokenRoles],
    spliced: Sequence[np.ndarray],
    answers: Sequence[str],
    images: Tensor | None,
    rows_out: dict[str, np.ndarray],
    image_rows: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Left-pad the rows that loaded, run the recorded forward, fill their rows of the tables.

    Args:
        n: Samples in the batch (``ok`` are the rows recorded; the others stay zero).
        images: Pixels in placeholder order (one per row of ``image_rows``, or per row).
        image_rows: Rows (indices into ``ok``) that hold an image, when not all do.

    Returns:
        ``{key: [layer, n, *shape]}``.
    """
    acts: dict[str, np.ndarray] = {}
    if len(ok) < n:
        acts = {a.key: np.zeros((a.n_layer_slots, n, *a.shape), dtype=layout.dtype) for a in layout.arrays}
    if not ok:
        return acts
    width = max(len(t) for t in text_ids)
    if all(len(t) == width for t in text_ids):
        input_ids = torch.tensor([list(t) for t in text_ids])
        mask = torch.ones((len(ok), width), dtype=torch.long)
    else:  # left-pad the text ids; the model splices real tokens only
        input_ids = torch.full((len(ok), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ok), width), dtype=torch.long)
        for b, ids in enumerate(text_ids):
            input_ids[b, width - len(ids) :] = torch.tensor(list(ids))
            mask[b, width - len(ids) :] = 1
    selections = recorder.selections(roles)
    recorded, _ = recorder.record(
        _Rows(input_ids, mask, list(roles), [list(t) for t in text_ids]), images, selections, image_rows
    )
    if len(ok) == n:
        acts = recorded
    else:
        rows_ok = np.asarray(ok)
        for key, value in recorded.items():
            acts[key][:, rows_ok] = value
    for b, (i, r, ids) in enumerate(zip(ok, roles, spliced, strict=True)):
        m = len(r)
        rows_out["samples/n_positions"][i] = m
        rows_out["samples/n_images"][i] = r.n_images
        rows_out["tokens/ids"][i, :m] = ids
        rows_out["tokens/role"][i, :m] = r.role
        rows_out["tokens/image_index"][i, :m] = r.image_index
        rows_out["samples/answer"][i] = encode_text(answers[b], layout.answer_bytes)
        for select, table in selections.items():
            rows_out[f"select/{select}/positions"][i] = table[b]
            rows_out[f"select/{select}/count"][i] = int((table[b] >= 0).sum())
    return acts


def _warn_environment(writer: StoreWriter, attrs: Mapping[str, Any], path: str | Path) -> None:
    stored_env = writer.stored_attrs.get("environment")
    if stored_env is not None and stored_env != attrs["environment"] and not writer.complete:
        warnings.warn(
            f"resuming {path} in another environment ({stored_env} -> {attrs['environment']}): the "
            "rows recorded now equal an uninterrupted run up to float rounding, not bit for bit "
            "(matmul results depend on the thread count and hardware)",
            stacklevel=3,
        )


def _record_batch(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    load: Callable[[Any], Tensor],
    recorder: Recorder,
    chunk: Sequence[Any],
    start: int,
    encoded: EncodedPrompt,
    run: RunConfig,
    level_ids: list[int],
    layout: StoreLayout,
    role_cache: dict[tuple[int, ...], tuple[TokenRoles, np.ndarray]],
) -> BatchRows:
    """Load, run and record one batch of the shared prompt; failed images become error rows."""
    n = len(chunk)
    status, errors, pixels = _load_pixels(load, chunk)
    ok = [i for i in range(n) if status[i] == STATUS_OK]
    rows_out = _empty_rows(layout, n)
    acts: dict[str, np.ndarray] = {}
    if ok:
        images = torch.stack(pixels)
        text_ids, answers = _texts(model, tokenizer, images, encoded, run, start, len(ok))
        roles, spliced = [], []
        for ids in text_ids:  # in score mode every row is the same prompt: roles are computed once
            key = tuple(ids)
            if key not in role_cache:
                quality = (
                    encoded.quality_index
                    if run.mode == "score"
                    else find_quality_index(ids, level_ids, response_start=encoded.response_start)
                )
                r = assign_roles(
                    ids,
                    response_start=encoded.response_start,
                    quality_index=quality,
                    n_image_tokens=model.cfg.n_image_tokens,
                    bos_id=tokenizer.bos_id,
                )
                role_cache[key] = (r, _spliced_ids(ids, r))
                if len(role_cache) > 4096:  # generated answers are all different: keep the cache small
                    role_cache.pop(next(iter(role_cache)))
            roles.append(role_cache[key][0])
            spliced.append(role_cache[key][1])
        acts = _record_rows(
            tokenizer, recorder, layout, n, ok, text_ids, roles, spliced, answers, images, rows_out
        )
    else:
        acts = {a.key: np.zeros((a.n_layer_slots, n, *a.shape), dtype=layout.dtype) for a in layout.arrays}
    for i, reason in enumerate(errors):
        rows_out["samples/error"][i] = encode_text(reason, ERROR_BYTES)
    return BatchRows(start=start, status=status, rows=rows_out, acts=acts)


def _record_prompt_batch(
    tokenizer: Tokenizer,
    load: Callable[[Any], Tensor],
    recorder: Recorder,
    chunk: Sequence[PromptedSample],
    roles: Sequence[TokenRoles | None],
    start: int,
    layout: StoreLayout,
) -> BatchRows:
    """Load the images that the batch's prompts hold, run and record; failed images become error rows."""
    n = len(chunk)
    needs = [s.prompt is not None and s.prompt.n_images > 0 for s in chunk]
    status, errors, pixels = _load_pixels(load, chunk, needs)
    for i, sample in enumerate(chunk):
        if sample.prompt is None:  # failed before recording (e.g. its image could not be rated)
            status[i], errors[i] = STATUS_FAILED, sample.error
    ok = [i for i in range(n) if status[i] == STATUS_OK]
    rows_out = _empty_rows(layout, n)
    text_ids = [list(chunk[i].prompt.ids) for i in ok]
    kept = [roles[i] for i in ok]
    image_rows = [b for b, i in enumerate(ok) if needs[i]]
    acts = _record_rows(
        tokenizer,
        recorder,
        layout,
        n,
        ok,
        text_ids,
        kept,
        [_spliced_ids(t, r) for t, r in zip(text_ids, kept, strict=True)],
        [chunk[i].answer for i in ok],
        torch.stack(pixels) if pixels else None,
        rows_out,
        None if len(image_rows) == len(ok) else image_rows,
    )
    for i, reason in enumerate(errors):
        rows_out["samples/error"][i] = encode_text(reason, ERROR_BYTES)
    return BatchRows(start=start, status=status, rows=rows_out, acts=acts)


def _empty_rows(layout: StoreLayout, n: int) -> dict[str, np.ndarray]:
    rows = {}
    for name, (dtype, row) in layout.row_datasets().items():
        if name == "samples/status":
            continue
        fill = {"tokens/ids": _PAD_ID, "tokens/role": int(Role.PAD), "tokens/image_index": -1}.get(name, 0)
        if name.endswith("/positions"):
            fill = -1
        rows[name] = np.full((n, *row), fill, dtype=np.dtype(dtype))
    return rows


def _texts(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    images: Tensor,
    encoded: EncodedPrompt,
    run: RunConfig,
    start: int,
    n: int,
) -> tuple[list[list[int]], list[str]]:
    """Text-space ids of each row to record, and the generated answers ("" when scoring)."""
    prompt_ids = list(encoded.ids)
    if run.mode == "score":
        return [prompt_ids] * n, [""] * n
    device = model.device
    generator = torch.Generator(device=device).manual_seed(_batch_seed(run.seed, start))
    ids = torch.tensor([prompt_ids] * n, device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            images=images.to(device, model.dtype),
            max_new_tokens=run.max_new_tokens,
            do_sample=run.do_sample,
            temperature=run.temperature,
            top_k=run.top_k,
            top_p=run.top_p,
            generator=generator,
            eos_token_id=tokenizer.eos_id,
        )
    texts, answers = [], []
    for row in out[:, len(prompt_ids) :].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id) + 1]
        texts.append(prompt_ids + row)
        answers.append(tokenizer.decode(row))
    return texts, answers


def iter_batches(n: int, batch_size: int, first: int = 0) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` of the batches from the one holding ``first`` on (the fixed partition)."""
    start = first - first % batch_size
    while start < n:
        yield start, min(n, start + batch_size)
        start += batch_size
