"""Q-Scorer (the third paper; DESIGN.md, "Q-Scorer"): score tokens and an MLP that regresses MOS.

How it connects: a one-stage checkpoint (:mod:`mechbiqa.train`, read with
:func:`~mechbiqa.model.load.load_components`) gets ``n_bins`` new tokens
``<score_0>`` .. ``<score_{n-1}>`` (:func:`add_score_tokens`, :func:`extend_vocab`):
token ``k`` stands for the MOS interval ``[k/n, (k+1)/n)`` on 0-1. The
training answer is the one-stage answer followed by the interval's token,
``"{description} The quality of the image is good.<score_3>"``
(:func:`qscorer_answer`). A small MLP (:class:`ScoreHead`) reads the hidden
state *at* the score token (the last layer, **after** ``ln_final``: the very
vector ``lm_head`` reads, ``ModelOutput.hidden_states[-1]``) and regresses MOS
on 0-1. Loss: ``L_ce + lambda * L_score`` (label-smoothed NLL on answer tokens,
:func:`mechbiqa.train.label_smoothed_nll`, plus the MSE of the regression;
:func:`qscorer_loss`).

Research choices: new rows of the embedding and of ``lm_head`` start as
copies of the rows of the level word whose Q-Align interval holds the score
interval's centre (``<score_4>`` of 5 starts as "excellent"), so the new
tokens start where the model already encodes quality; the regression reads
the normed state because that is what the model shapes for its next-token
decision.

The checkpoint is an ordinary one-stage directory (:func:`save_qscorer`):
``config.json`` carries the grown vocabulary, the tokenizer holds the added
pieces, ``score_head.safetensors`` holds the MLP, and ``mechbiqa.json`` a
``score_head`` field (bins, width, site, lambda). ``load_pretrained`` reads the
model like any other (it never opens ``score_head.safetensors``: the weights
file is ``model.safetensors``); :func:`load_qscorer` adds the head.
:class:`QScorer` rates images and reports both the token and the regressed score;
:class:`QScorerRater` is the same checkpoint as a `mechbiqa.pipeline.OneStageRater`
(`mechbiqa.checkpoint.open_checkpoint` returns one for a Q-Scorer directory), whose
ratings (:class:`QScorerRating`) carry the Q-Align reading, the token and the regression.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mechbiqa.finetune_io import add_lora, core_model, write_checkpoint
from mechbiqa.model.load import Components, load_components
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, encode_answer, get_template
from mechbiqa.model.tokenizer import CompactTokenizer, SentencePieceTokenizer, Tokenizer
from mechbiqa.pipeline import (
    OneStageRater,
    Rating,
    _ratings,
    answer_text,
    read_info,
    score_prompts,
    scoring_prompt,
    split_answer,
    task_prompt,
)
from mechbiqa.train import IGNORE_INDEX, EncodedExample, Example, collate, label_smoothed_nll

__all__ = [
    "SCORE_HEAD_FILE",
    "INFO_KEY",
    "ScoreTokenSpec",
    "QScorerTrainConfig",
    "score_bin",
    "bin_value",
    "bin_level",
    "add_score_tokens",
    "score_token_ids",
    "extend_vocab",
    "ScoreHead",
    "qscorer_answer",
    "encode_qscorer_example",
    "qscorer_loss",
    "train_qscorer",
    "save_qscorer",
    "load_qscorer",
    "QScore",
    "QScorer",
]

SCORE_HEAD_FILE = "score_head.safetensors"
INFO_KEY = "score_head"
"""The ``mechbiqa.json`` field that marks a Q-Scorer checkpoint."""


@dataclass(frozen=True, slots=True)
class ScoreTokenSpec:
    """What a Q-Scorer checkpoint adds (saved in ``mechbiqa.json``).

    Attributes:
        n_bins: Score tokens, one per equal-width MOS interval on 0-1 (the paper: 5 or more).
        d_hidden: Width of the MLP's hidden layer.
        site: Where the MLP reads: ``"ln_final"`` (the last layer after the final norm).
        lam: ``lambda`` in ``L_ce + lambda * L_score``.
    """

    n_bins: int = 5
    d_hidden: int = 128
    site: str = "ln_final"
    lam: float = 1.0

    def __post_init__(self) -> None:
        """Validate."""
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.d_hidden < 1 or self.lam < 0:
            raise ValueError("need d_hidden >= 1 and lam >= 0")
        if self.site != "ln_final":
            raise ValueError(f"site must be 'ln_final' (the only one implemented), got {self.site!r}")

    @property
    def pieces(self) -> tuple[str, ...]:
        """``<score_0>`` (lowest interval) .. ``<score_{n-1}>``."""
        return tuple(f"<score_{k}>" for k in range(self.n_bins))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreTokenSpec:
        """From ``mechbiqa.json``'s field (unknown keys ignored)."""
        return cls(**{k: data[k] for k in ("n_bins", "d_hidden", "site", "lam") if k in data})


@dataclass(frozen=True, slots=True)
class QScorerTrainConfig:
    """A Q-Scorer fine-tuning run (from a one-stage checkpoint).

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: AdamW learning rate (model and head).
        head_lr: Learning rate of the head (None: ``lr``).
        label_smoothing: Eq. 2's epsilon for ``L_ce``.
        clip_norm: Gradient-norm clip (0: none).
        template: Conversation template.
        seed: Seeds the head's initialisation and the data order.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-4
    head_lr: float | None = 1e-3
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    template: str = "v1"
    seed: int = 0


# --------------------------------------------------------------------------------------------- tokens
def score_bin(mos01: float, n_bins: int) -> int:
    """The interval of a 0-1 score: ``min(n - 1, floor(mos * n))`` (0 = lowest)."""
    return min(n_bins - 1, max(0, int(math.floor(float(mos01) * n_bins))))


def bin_value(k: int, n_bins: int) -> float:
    """The score a token stands for: its interval's centre ``(k + 0.5) / n``."""
    return (k + 0.5) / n_bins


def bin_level(k: int, n_bins: int) -> str:
    """The level word whose Q-Align bin (five equal-width bins of 0-1) holds the interval's centre."""
    return LEVEL_WORDS[len(LEVEL_WORDS) - 1 - score_bin(bin_value(k, n_bins), len(LEVEL_WORDS))]


def add_score_tokens(tokenizer: Tokenizer, spec: ScoreTokenSpec) -> Tokenizer:
    """A copy of the tokenizer with the score pieces appended (ids ``vocab_size .. vocab_size + n - 1``).

    SentencePiece (real checkpoints): user-defined pieces in the model proto, so
    ``tokenizer.model`` saves and reloads them. Compact: added tokens in ``tokenizer.json``.

    Raises:
        ValueError: If the tokenizer already has one of the pieces.
    """
    present = [p for p in spec.pieces if tokenizer.piece_to_id(p) != tokenizer.unk_id]
    if present:
        raise ValueError(
            f"the tokenizer already has {present}; pass the one-stage checkpoint's own tokenizer"
        )
    if isinstance(tokenizer, SentencePieceTokenizer):
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(tokenizer.__reduce__()[1][0])  # the model bytes (how it pickles)
        for piece in spec.pieces:
            entry = proto.pieces.add()
            entry.piece, entry.score, entry.type = piece, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        out: Tokenizer = SentencePieceTokenizer.from_proto(proto.SerializeToString())
    elif isinstance(tokenizer, CompactTokenizer):
        from tokenizers import AddedToken

        backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
        backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in spec.pieces])
        out = CompactTokenizer(backend)
    else:
        raise TypeError(f"cannot add tokens to a {type(tokenizer).__name__}")
    score_token_ids(out, spec)
    return out


def score_token_ids(tokenizer: Tokenizer, spec: ScoreTokenSpec) -> list[int]:
    """The ids of the score pieces, lowest interval first.

    Raises:
        ValueError: If a piece is missing (the tokenizer was not given the score tokens).
    """
    ids = [tokenizer.piece_to_id(p) for p in spec.pieces]
    if tokenizer.unk_id in ids:
        raise ValueError("the tokenizer has no score tokens; add them with add_score_tokens")
    return ids


@torch.no_grad()
def extend_vocab(model: MPLUGOwl2, tokenizer: Tokenizer, spec: ScoreTokenSpec) -> MPLUGOwl2:
    """A copy of the model whose embedding and ``lm_head`` have rows for the score tokens.

    Call it before adding LoRA adapters. New rows start as copies of the level word of each
    interval (:func:`bin_level`); rows of ids the model already had are kept.

    Args:
        model: The one-stage model.
        tokenizer: The tokenizer *with* the score tokens (:func:`add_score_tokens`).
        spec: The score tokens.
    """
    ids = score_token_ids(tokenizer, spec)
    old = model.cfg.llm.vocab_size
    vocab = max(old, max(ids) + 1)
    cfg = replace(model.cfg, llm=replace(model.cfg.llm, vocab_size=vocab))
    state = dict(model.state_dict())
    for key in ("llm.embed.weight", "llm.unembed.weight"):
        weight = state[key]
        grown = (
            torch.cat([weight, weight.new_zeros(vocab - old, weight.shape[1])])
            if vocab > old
            else weight.clone()
        )
        for k, i in enumerate(ids):
            grown[i] = weight[tokenizer.word_id(bin_level(k, spec.n_bins))]
        state[key] = grown
    with torch.device("meta"):
        out = MPLUGOwl2(cfg)
    out.load_state_dict(state, strict=True, assign=True)
    return out.train(model.training)


class ScoreHead(nn.Module):
    """The MLP that regresses MOS (0-1) from the hidden state at the score token."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        """Two linear layers with a GELU; the output bias starts at 0.5 (the middle of the scale)."""
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, 1)
        with torch.no_grad():
            self.fc2.bias.fill_(0.5)

    def forward(self, hidden: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        """The regressed score per row (float32)."""
        return self.fc2(self.act(self.fc1(hidden.float()))).squeeze(-1)


# --------------------------------------------------------------------------------------------- data and loss
def qscorer_answer(description: str, level: str, mos01: float, n_bins: int) -> str:
    """The training answer: the one-stage answer, then the interval's score token."""
    return f"{answer_text('one-stage', description, level)}<score_{score_bin(mos01, n_bins)}>"


def encode_qscorer_example(
    tokenizer: Tokenizer, template_name: str, example: Example, spec: ScoreTokenSpec
) -> EncodedExample:
    """The one-stage prompt and the Q-Scorer answer (labels on the answer only, ``</s>`` included).

    Raises:
        ValueError: If the example has no MOS (``score``) or no level word.
    """
    if example.score is None or example.level is None or not example.description:
        raise ValueError(f"example {example.id!r} needs a score (MOS 0-1), a level word and a description")
    prompt = task_prompt(tokenizer, get_template(template_name), "one-stage")
    answer = encode_answer(
        tokenizer, qscorer_answer(example.description, example.level, example.score, spec.n_bins)
    )
    return EncodedExample(
        ids=prompt.ids + tuple(answer),
        labels=(IGNORE_INDEX,) * len(prompt.ids) + tuple(answer),
        n_images=prompt.n_images,
    )


def qscorer_loss(
    model: MPLUGOwl2,
    head: ScoreHead,
    input_ids: Int[Tensor, "batch text_pos"],
    attention_mask: Int[Tensor, "batch text_pos"],
    labels: Int[Tensor, "batch pos"],
    pixels: Float[Tensor, "batch 3 S S"],
    targets: Float[Tensor, " batch"],
    score_ids: Sequence[int],
    lam: float,
    smoothing: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """``L_ce + lambda * L_score`` for a collated batch (:func:`mechbiqa.train.collate`).

    The score token's position is where ``labels`` holds a score id (one per row).
    """
    out = model(input_ids, images=pixels, attention_mask=attention_mask, output_hidden_states=True)
    ce, _ = label_smoothed_nll(out.logits, labels, smoothing)
    at = torch.isin(labels, torch.tensor(list(score_ids), device=labels.device))  # [batch, pos]
    if not bool((at.sum(1) == 1).all()):
        raise ValueError("each answer must hold exactly one score token (encode with encode_qscorer_example)")
    hidden = out.hidden_states[-1][at]  # [batch, d_model] after ln_final, at the score token
    mse = F.mse_loss(head(hidden), targets.float())
    return ce + lam * mse, {"ce": float(ce.detach()), "mse": float(mse.detach())}


def train_qscorer(
    model: nn.Module,
    head: ScoreHead,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    examples: Sequence[Example],
    spec: ScoreTokenSpec,
    cfg: QScorerTrainConfig,
    *,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float | int]]:
    """Fine-tune a model with score tokens and its head, in place (trainable: ``requires_grad`` parameters).

    Args:
        model: An `MPLUGOwl2` already given the score tokens (:func:`extend_vocab`), optionally with LoRA.
        head: The :class:`ScoreHead`.
        tokenizer: The tokenizer with the score tokens.
        processor: The image processor.
        examples: Images with MOS (0-1), level word and description.
        spec: The score tokens.
        cfg: The run.
        progress: Called with each step's record.

    Returns:
        One record per step: ``step``, ``loss``, ``ce``, ``mse``, ``seconds``.
    """
    core = core_model(model)
    device = core.device
    head.to(device)
    encoded = [encode_qscorer_example(tokenizer, cfg.template, e, spec) for e in examples]
    targets = torch.tensor([float(e.score) for e in examples])  # type: ignore[arg-type]
    ids_of_scores = score_token_ids(tokenizer, spec)
    body = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": list(head.parameters()), "lr": cfg.head_lr or cfg.lr}],
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.0,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history = []
    core.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        while len(order) < cfg.batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        index, order = order[: cfg.batch_size], order[cfg.batch_size :]
        ids, mask, labels = collate([encoded[i] for i in index], tokenizer.pad_id, core.cfg.n_image_tokens)
        loss, parts = qscorer_loss(
            core,
            head,
            ids.to(device),
            mask.to(device),
            labels.to(device),
            processor([examples[i].image for i in index]).to(device, core.dtype),  # only the batch's images
            targets[index].to(device),
            ids_of_scores,
            spec.lam,
            cfg.label_smoothing,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(body + list(head.parameters()), cfg.clip_norm)
        optimizer.step()
        record = {
            "step": step + 1,
            "loss": float(loss.detach()),
            **parts,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if progress is not None:
            progress(record)
    core.eval()
    return history


# --------------------------------------------------------------------------------------------- checkpoint
def save_qscorer(
    directory: str | Path,
    model: nn.Module,
    head: ScoreHead,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    spec: ScoreTokenSpec,
    template: str = "v1",
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Write a one-stage checkpoint with score tokens, ``score_head.safetensors`` and its JSON field."""
    core = core_model(model)
    info = {
        "format": 1,
        "mode": "one-stage",
        "stage": None,
        "task": "one-stage",
        "template": template,
        INFO_KEY: {
            **asdict(spec),
            "file": SCORE_HEAD_FILE,
            "d_model": core.cfg.llm.d_model,
            "pieces": list(spec.pieces),
            "ids": score_token_ids(tokenizer, spec),
        },
        **(extra_info or {}),
    }
    directory = write_checkpoint(directory, model, tokenizer, processor, info)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()},
        str(directory / SCORE_HEAD_FILE),
        metadata={"format": "pt"},
    )
    return directory


@dataclass(frozen=True)
class QScore:
    """One image rated by a Q-Scorer.

    Attributes:
        answer: The generated answer (up to and including the score token).
        token: The score piece (``<score_k>``).
        bin: ``k`` (0 = lowest interval).
        token_score: The token's own score, its interval's centre (0-1).
        token_expected: Probability-weighted interval centres over the score tokens (0-1).
        regressed: The MLP's score (0-1).
        emitted: Whether the model wrote the score token itself (else it was chosen by argmax
            over the score tokens after the answer).
    """

    answer: str
    token: str
    bin: int
    token_score: float
    token_expected: float
    regressed: float
    emitted: bool


@dataclass
class QScorer:
    """A Q-Scorer checkpoint: components (model, tokenizer, processor), head and spec."""

    components: Components
    head: ScoreHead
    spec: ScoreTokenSpec
    template: str = "v1"
    max_new_tokens: int = 48
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def rate(self, images: Sequence[Any] | Tensor, batch_size: int = 32) -> list[QScore]:
        """Generate each answer, read its score token, and regress the score at that token.

        Args:
            images: Paths, PIL images, or preprocessed pixels ``[n, 3, S, S]``.
            batch_size: Images per forward.
        """
        c = self.components
        model, tok = c.model, c.tokenizer
        pixels = images if isinstance(images, Tensor) else c.processor(list(images))
        prompt = list(task_prompt(tok, get_template(self.template), "one-stage").ids)
        score_ids = score_token_ids(tok, self.spec)
        values = torch.tensor([bin_value(k, self.spec.n_bins) for k in range(self.spec.n_bins)])
        out: list[QScore] = []
        for start in range(0, len(pixels), batch_size):
            px = pixels[start : start + batch_size].to(model.device, model.dtype)
            n = len(px)
            ids = torch.tensor([prompt] * n, device=model.device)
            new = model.generate(ids, images=px, max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_id)[
                :, len(prompt) :
            ].tolist()
            answers, emitted = [], []
            for row in new:
                cut = next((i for i, t in enumerate(row) if t in score_ids or t == tok.eos_id), len(row))
                emitted.append(cut < len(row) and row[cut] in score_ids)
                answers.append(row[:cut])
            before = self._last(model, prompt, answers, px, hidden=False)  # [n, vocab] where the token goes
            probs = before[:, score_ids].float().softmax(-1).cpu()
            chosen = [
                row[len(a)] if e else score_ids[int(p.argmax())]
                for row, a, e, p in zip(new, answers, emitted, probs, strict=True)
            ]
            rows = [a + [t] for a, t in zip(answers, chosen, strict=True)]
            hidden = self._last(model, prompt, rows, px, hidden=True)
            regressed = self.head(hidden.float()).cpu()  # the head stays float32 in any model dtype
            for i in range(n):
                k = score_ids.index(chosen[i])
                out.append(
                    QScore(
                        answer=tok.decode(answers[i] + [chosen[i]]).strip(),
                        token=self.spec.pieces[k],
                        bin=k,
                        token_score=bin_value(k, self.spec.n_bins),
                        token_expected=float(probs[i] @ values),
                        regressed=float(regressed[i]),
                        emitted=bool(emitted[i]),
                    )
                )
        return out

    @staticmethod
    def _last(
        model: MPLUGOwl2, prompt: list[int], answers: Sequence[list[int]], pixels: Tensor, hidden: bool
    ) -> Tensor:
        """Logits ``[n, vocab]`` or the last hidden state ``[n, d]`` at each row's last real token."""
        rows = [prompt + a for a in answers]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out = model(
            ids.to(model.device),
            images=pixels,
            attention_mask=mask.to(model.device),
            output_hidden_states=hidden,
        )
        return out.hidden_states[-1][:, -1] if hidden else out.logits[:, -1]  # last column = last real token


def load_qscorer(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 48,
) -> QScorer:
    """Load a Q-Scorer checkpoint: :func:`~mechbiqa.model.load.load_components` plus the head.

    Raises:
        ValueError: If the checkpoint has no ``score_head`` field in ``mechbiqa.json`` (not a Q-Scorer).
    """
    path = Path(path)
    info = read_info(path)
    if INFO_KEY not in info.data:
        raise ValueError(
            f"{path} is not a Q-Scorer checkpoint (no {INFO_KEY!r} in mechbiqa.json); "
            "train one with mechbiqa.qscorer.train_qscorer and save_qscorer"
        )
    spec = ScoreTokenSpec.from_dict(info.data[INFO_KEY])
    comps = load_components(path, dtype=dtype, device=device)
    head = ScoreHead(comps.model.cfg.llm.d_model, spec.d_hidden)
    head.load_state_dict(load_file(str(path / info.data[INFO_KEY].get("file", SCORE_HEAD_FILE))))
    head.to(device).eval()
    return QScorer(
        components=comps,
        head=head,
        spec=spec,
        template=info.template,
        max_new_tokens=max_new_tokens,
        info=info.data,
    )


def qscorer_from_checkpoint(
    path: str | Path,
    spec: ScoreTokenSpec,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[MPLUGOwl2, ScoreHead, Tokenizer, ImageProcessor]:
    """A one-stage checkpoint made ready for :func:`train_qscorer`: score tokens, vocab grown, new head."""
    comps = load_components(path, dtype=dtype, device=device)
    tokenizer = add_score_tokens(comps.tokenizer, spec)
    model = extend_vocab(comps.model, tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ScoreHead(model.cfg.llm.d_model, spec.d_hidden).to(device)
    return model, head, tokenizer, comps.processor


__all__ += ["qscorer_from_checkpoint"]


def finetune_qscorer(
    init_from: str | Path,
    out_dir: str | Path,
    examples: Sequence[Example],
    spec: ScoreTokenSpec,
    cfg: QScorerTrainConfig,
    *,
    lora_rank: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float | int]]:
    """A Q-Scorer from a one-stage checkpoint directory: add tokens, train, and write it to ``out_dir``.

    With ``lora_rank`` (7B on a GPU) the LLM gets LoRA adapters and the embedding and ``lm_head``
    stay trainable in full, so the score tokens' rows learn; the written weights are merged.

    Returns:
        The per-step history (also written into ``mechbiqa.json`` as ``qscorer_history``).
    """
    from mechbiqa.pipeline import expect_checkpoint

    info = expect_checkpoint(init_from, "one-stage")
    model, head, tokenizer, processor = qscorer_from_checkpoint(
        init_from, spec, seed=cfg.seed, dtype=dtype, device=device
    )
    if lora_rank is not None:
        model = add_lora(model, lora_rank, also_train=("llm.embed.weight", "llm.unembed.weight"))
    history = train_qscorer(model, head, tokenizer, processor, examples, spec, cfg, progress=progress)
    save_qscorer(
        out_dir,
        model,
        head,
        tokenizer,
        processor,
        spec,
        template=info.template,
        extra_info={
            "parent": str(init_from),
            "step": cfg.steps,
            "qscorer_config": asdict(cfg),
            "qscorer_history": history,
        },
    )
    return history


__all__ += ["finetune_qscorer"]


# --------------------------------------------------------------------------------------------- as a rater
@dataclass(frozen=True)
class QScorerRating(Rating):
    """A Q-Scorer's `mechbiqa.pipeline.Rating`: the Q-Align reading, the score token and the regression.

    Attributes:
        token: The score piece (``<score_k>``).
        bin: ``k`` (0 = lowest interval).
        token_score: The token's interval centre (0-1).
        token_expected: Probability-weighted interval centres over the score tokens (0-1).
        regressed: The MLP's score (0-1).
        emitted: Whether the model wrote the score token itself.
    """

    token: str = ""
    bin: int = -1
    token_score: float = float("nan")
    token_expected: float = float("nan")
    regressed: float = float("nan")
    emitted: bool = False


class QScorerRater(OneStageRater):
    """A Q-Scorer checkpoint as a one-stage rater: every analysis that takes a rater takes it.

    `rate` generates each answer once (:meth:`QScorer.rate`), reads the level words after its
    description as `OneStageRater` does (so ``score``/``level`` are the Q-Align reading and the
    scoring prompt is the one-stage one), and adds the score token and the regressed score
    (:class:`QScorerRating`).
    """

    def __init__(self, scorer: QScorer) -> None:
        """Wrap a loaded :class:`QScorer` (:func:`load_qscorer`)."""
        super().__init__(scorer.components, template=scorer.template, max_new_tokens=scorer.max_new_tokens)
        self.scorer = scorer

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> QScorerRater:
        """Load a Q-Scorer checkpoint (``dtype``, ``max_new_tokens`` as :func:`load_qscorer`)."""
        return cls(load_qscorer(path, device=device, **kwargs))

    @torch.no_grad()
    def rate(self, images: Sequence[Any] | Tensor, batch_size: int = 64) -> list[QScorerRating]:
        """Rate each image: Q-Align score after the description, score token, regressed score."""
        c = self.components
        pixels = images if isinstance(images, Tensor) else c.processor(list(images))
        scored = self.scorer.rate(pixels, batch_size=batch_size)
        answers = [q.answer for q in scored]
        descriptions = [split_answer(a)[0] for a in answers]
        prompts = [scoring_prompt(c.tokenizer, self.template, "one-stage", d) for d in descriptions]
        logits = score_prompts(c.model, c.tokenizer, prompts, pixels, batch_size=batch_size)
        plain = _ratings(c.tokenizer, self.template, "one-stage", descriptions, answers, prompts, logits,
                         c.model.cfg.n_image_tokens)  # fmt: skip
        return [
            QScorerRating(**{f.name: getattr(r, f.name) for f in fields(Rating)}, token=q.token, bin=q.bin,
                          token_score=q.token_score, token_expected=q.token_expected, regressed=q.regressed,
                          emitted=q.emitted)  # fmt: skip
            for r, q in zip(plain, scored, strict=True)
        ]


def is_qscorer(path: str | Path) -> bool:
    """Whether a checkpoint directory is a Q-Scorer (its ``mechbiqa.json`` has the ``score_head`` field)."""
    try:
        return INFO_KEY in read_info(path).data
    except FileNotFoundError:
        return False


__all__ += ["QScorerRating", "QScorerRater", "is_qscorer"]
