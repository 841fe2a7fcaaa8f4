"""Tokenizers: the LLaMA-2 SentencePiece model of real checkpoints, and a compact one.

Everything in mechbiqa that turns text into ids goes through the small
:class:`Tokenizer` contract defined here:

* :mod:`mechbiqa.model.prompts` builds prompts and tokenizes them chunk by chunk
  around the ``<|image|>`` tag (``tokenize_prompt``), the way mPLUG-Owl2's
  ``tokenizer_image_token`` does;
* :mod:`mechbiqa.model.roles` labels every position of the result;
* scoring reads the level-word ids from :meth:`Tokenizer.word_id`.

Two implementations share that contract:

* :class:`SentencePieceTokenizer` reads the ``tokenizer.model`` file of a real
  mPLUG-Owl2 / Q-Instruct / Q-Align checkpoint with the ``sentencepiece``
  package. Its ids equal those of the original slow
  ``LlamaTokenizer(use_fast=False)`` (transformers 4.31, legacy mode) without the
  BOS that tokenizer prepends.
* :class:`CompactTokenizer` wraps a HuggingFace ``tokenizers`` BPE model
  (``tokenizer.json``) trained on the built-in benchmark's text by
  :func:`train_compact_tokenizer`, for the compact model. It keeps LLaMA's
  special ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) and byte-fallback pieces
  (``<0x00>`` .. ``<0xFF>`` at ids 3..258) and reproduces SentencePiece's dummy
  prefix, so the same chunked-tokenization code serves both.

:func:`load_tokenizer` picks the implementation from the files in a directory.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mechbiqa.model.config import IMAGE_TOKEN_INDEX, LEVEL_WORDS

IMAGE_TAG = "<|image|>"
"""The prompt text that marks where an image goes. It is not a vocabulary token."""

IMAGE_TOKEN_ID = IMAGE_TOKEN_INDEX
"""The placeholder id that stands for an image in text-space ids (mPLUG-Owl2's
``IMAGE_TOKEN_INDEX``); the model splices the image's tokens in its place."""

SPIECE_UNDERLINE = "▁"
"""SentencePiece's word-start marker (U+2581), also used by :class:`CompactTokenizer`."""

TOKENIZER_CONFIG = "tokenizer_config.json"
"""File written beside the tokenizer; its ``mechbiqa_tokenizer`` field names the kind."""


_N_BYTE_PIECES = 256


class Tokenizer(abc.ABC):
    """The tokenizer contract of mechbiqa.

    ``encode`` never adds BOS or EOS: prompt and answer builders add them where
    the original code does. Each call to ``encode`` behaves like one call to the
    original slow LLaMA tokenizer on one text chunk:

    * SentencePiece's dummy prefix: the chunk is read as if it started with a
      space, so ``encode("good")`` starts with the piece ``▁good`` and a chunk
      that starts with a space or a newline begins with a lone ``▁``;
    * the special-token strings ``<unk>``, ``<s>`` and ``</s>`` inside the text
      become their ids, and the text between them is encoded piece by piece,
      each piece with its own dummy prefix (the slow tokenizer's legacy mode).

    Attributes:
        kind: The name written to ``tokenizer_config.json`` and read by
            :func:`load_tokenizer`.
    """

    kind: ClassVar[str]

    def __init__(self, *, unk_id: int, bos_id: int, eos_id: int, special_pieces: dict[str, int]) -> None:
        """Record the special ids and pieces (called by the implementations)."""
        self._unk_id = unk_id
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._special_pieces = dict(special_pieces)
        # Longest first, so that no special string is split by a shorter one.
        alternatives = sorted(self._special_pieces, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    # ----------------------------------------------------------------- ids
    @property
    def unk_id(self) -> int:
        """Id of ``<unk>``."""
        return self._unk_id

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``, the beginning of sequence."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``, the end of sequence (the templates' ``sep2``)."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id used to pad batches: ``unk_id``.

        LLaMA defines no pad piece and the original training pads with ``<unk>``.
        """
        return self._unk_id

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids that :meth:`decode` skips (``<unk>``, ``<s>``, ``</s>``)."""
        return frozenset(self._special_pieces.values())

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, i.e. rows of the embedding matrix the tokenizer needs."""

    # ---------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        """Encode one text chunk, without BOS or EOS.

        Args:
            text: Any text. It must not contain the ``<|image|>`` tag: split on
                it first (``prompts.tokenize_prompt`` does).

        Returns:
            The ids, as the original slow ``LlamaTokenizer`` gives them after
            its BOS.

        Raises:
            ValueError: If the text contains ``<|image|>``.
        """
        if IMAGE_TAG in text:
            raise ValueError(
                f"encode() got text containing the image tag {IMAGE_TAG!r}, which is not a vocabulary "
                "token; tokenize prompts with images with mechbiqa.model.prompts.tokenize_prompt()"
            )
        ids: list[int] = []
        for segment in self._special_pattern.split(text):
            if segment in self._special_pieces:
                ids.append(self._special_pieces[segment])
            elif segment:
                ids.extend(self._encode_chunk(segment))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text, skipping special ids and image placeholders.

        Args:
            ids: Token ids; negative ids (the ``-200`` image placeholder) and
                ``<unk>``/``<s>``/``</s>`` are skipped.

        Returns:
            The text, without the dummy-prefix space at its start.
        """
        specials = self.special_ids
        kept = [int(i) for i in ids if int(i) >= 0 and int(i) not in specials]
        return self._decode(kept)

    def word_id(self, word: str, *, strict: bool = False) -> int:
        """The id that stands for a word, by Q-Align's rule ``tokenizer(word).input_ids[1]``.

        That is the first piece of the word with its dummy prefix (``▁good``).
        With the real LLaMA-2 tokenizer, excellent/good/fair/poor/bad give
        15129/1781/6534/6460/4319; a longer word such as "moderate" gives its
        first piece only, as in the original evaluation scripts.

        Args:
            word: One word, without leading space.
            strict: If True, refuse a word that is not a single piece.

        Returns:
            The id of the word's first piece.

        Raises:
            ValueError: If the word is empty, or ``strict`` and it takes more
                than one piece.
        """
        ids = self.encode(word)
        if not ids:
            raise ValueError("word_id() got an empty word; pass a word such as 'good'")
        if strict and len(ids) != 1:
            pieces = [self.id_to_piece(i) for i in ids]
            raise ValueError(
                f"word {word!r} is {len(ids)} pieces {pieces}, not one; pass strict=False to take "
                "the first piece (Q-Align's rule), or train the tokenizer with this word "
                "(train_compact_tokenizer(..., single_token_words=...))"
            )
        return ids[0]

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of an id (``▁good``, ``<0x0A>``), for display."""

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int:
        """The id of a vocabulary piece, or ``unk_id`` if there is none."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer and ``tokenizer_config.json`` into a directory.

        Args:
            directory: Created if missing.

        Returns:
            The directory.
        """

    @abc.abstractmethod
    def _encode_chunk(self, text: str) -> list[int]:
        """Encode non-empty text free of special strings, with the dummy prefix."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decode ids that contain no special or negative ids."""

    def __repr__(self) -> str:
        """Class name and vocabulary size."""
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _write_config(directory: Path, kind: str, extra: dict) -> None:
    config = {
        "mechbiqa_tokenizer": kind,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        **extra,
    }
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


class SentencePieceTokenizer(Tokenizer):
    """The LLaMA-2 SentencePiece tokenizer of real mPLUG-Owl2 checkpoints.

    Wraps ``sentencepiece`` directly. The LLaMA model file normalises nothing,
    adds the dummy prefix and falls back to bytes, which is what the original
    slow ``LlamaTokenizer`` relied on. (transformers 5's ``LlamaTokenizer`` is a
    converted BPE ``tokenizers`` model and differs on runs of spaces, e.g.
    ``" ASSISTANT:"``; it is not used.)

    Args:
        model_file: Path to a SentencePiece ``tokenizer.model``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a SentencePiece model.
    """

    kind: ClassVar[str] = "sentencepiece"
    model_filename: ClassVar[str] = "tokenizer.model"

    def __init__(self, model_file: str | Path) -> None:
        """Load the model file."""
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {path} does not exist; pass the tokenizer.model file of a checkpoint"
            )
        self._init_from_proto(path.read_bytes(), origin=str(path))

    @classmethod
    def from_proto(cls, proto: bytes) -> SentencePieceTokenizer:
        """Build from the serialized bytes of a SentencePiece model."""
        self = cls.__new__(cls)
        self._init_from_proto(proto, origin="<bytes>")
        return self

    def _init_from_proto(self, proto: bytes, *, origin: str) -> None:
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(
                f"{origin} is not a SentencePiece model ({error}); "
                "pass the tokenizer.model of a LLaMA checkpoint"
            ) from None
        self._proto = proto
        self._sp = processor
        unk, bos, eos = processor.unk_id(), processor.bos_id(), processor.eos_id()
        if min(unk, bos, eos) < 0:
            raise ValueError(
                f"SentencePiece model {origin} lacks <unk>/<s>/</s> (ids {unk}/{bos}/{eos}); "
                "a LLaMA tokenizer has 0/1/2"
            )
        specials = {processor.id_to_piece(i): i for i in (unk, bos, eos)}
        super().__init__(unk_id=unk, bos_id=bos, eos_id=eos, special_pieces=specials)

    def __reduce__(self):
        """Pickle as the model bytes."""
        return (SentencePieceTokenizer.from_proto, (self._proto,))

    @property
    def vocab_size(self) -> int:
        """Number of pieces (32000 for LLaMA-2)."""
        return self._sp.get_piece_size()

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id, e.g. 1781 -> ``▁good``."""
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece, or ``unk_id``."""
        return self._sp.piece_to_id(piece)

    def _encode_chunk(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.model`` and ``tokenizer_config.json`` (HF-loadable, slow LLaMA)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.model_filename).write_bytes(self._proto)
        _write_config(
            directory, self.kind, {"tokenizer_class": "LlamaTokenizer", "pad_token": None, "legacy": True}
        )
        return directory


def _metaspace_pipeline(tokenizer: HFTokenizer) -> None:
    """Give a ``tokenizers`` tokenizer SentencePiece's dummy-prefix behaviour.

    ``Metaspace(prepend_scheme="always")`` does not prepend when the text already
    starts with a space, unlike SentencePiece (``" ASSISTANT:"`` must begin with a
    lone ``▁``). So the prefix is added by the normaliser, unconditionally, and
    the pre-tokenizer only splits before each ``▁``.
    """
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=True
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )


class CompactTokenizer(Tokenizer):
    """A small BPE tokenizer (HuggingFace ``tokenizers``) for the compact model.

    Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` as in LLaMA, ids 3..258 are the
    byte-fallback pieces ``<0x00>``..``<0xFF>``, and the learnt pieces follow.
    Words carry SentencePiece's ``▁`` word-start marker and every chunk gets the
    dummy prefix, so ``word_id`` and chunked prompt tokenization work as with the
    real tokenizer. Build one with :func:`train_compact_tokenizer`.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` laid out as above.

    Raises:
        ValueError: If the special pieces are not at ids 0, 1, 2.
    """

    kind: ClassVar[str] = "compact"
    model_filename: ClassVar[str] = "tokenizer.json"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        """Wrap a built ``tokenizers.Tokenizer``."""
        self._tok = tokenizer
        expected = {"<unk>": 0, "<s>": 1, "</s>": 2}
        found = {piece: tokenizer.token_to_id(piece) for piece in expected}
        if found != expected:
            raise ValueError(
                f"compact tokenizer has special ids {found}, expected {expected}; "
                "build it with train_compact_tokenizer()"
            )
        super().__init__(unk_id=0, bos_id=1, eos_id=2, special_pieces=expected)

    @classmethod
    def from_file(cls, path: str | Path) -> CompactTokenizer:
        """Load from a ``tokenizer.json`` file.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is not a ``tokenizers`` JSON file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist; pass a tokenizer.json written by save()"
            )
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(
                f"{path} is not a tokenizers JSON file ({error}); re-create it with save()"
            ) from None
        return cls(tokenizer)

    @classmethod
    def from_str(cls, text: str) -> CompactTokenizer:
        """Build from the JSON text of a ``tokenizers`` tokenizer."""
        return cls(HFTokenizer.from_str(text))

    def __reduce__(self):
        """Pickle as the JSON text."""
        return (CompactTokenizer.from_str, (self._tok.to_str(),))

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The piece of an id, e.g. ``▁good``."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise ValueError(f"id {token_id} is outside the vocabulary of {self.vocab_size}")
        return piece

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece, or ``unk_id``."""
        token_id = self._tok.token_to_id(piece)
        return self.unk_id if token_id is None else token_id

    def _encode_chunk(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / self.model_filename))
        _write_config(
            directory, self.kind, {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<unk>"}
        )
        return directory


def _build_compact(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = HFTokenizer(model)
    _metaspace_pipeline(tokenizer)
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def _training_chunks(texts: Iterable[str], extra: Sequence[str]) -> Iterator[str]:
    """Yield the chunks ``encode`` will see: split on the image tag and the special strings."""
    splitter = re.compile("(?:" + "|".join(re.escape(s) for s in (IMAGE_TAG, "</s>", "<s>", "<unk>")) + ")")
    for text in texts:
        for chunk in splitter.split(text):
            if chunk:
                yield chunk
    yield " ".join(extra)


def train_compact_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    single_token_words: Sequence[str] = LEVEL_WORDS,
    min_frequency: int = 2,
) -> CompactTokenizer:
    """Train a small BPE tokenizer with LLaMA's special ids and dummy-prefix semantics.

    Research choice: the compact model should read its prompts the way the real
    model does, so the tokenizer keeps SentencePiece's conventions (word-start
    ``▁``, a dummy prefix per chunk, byte fallback, ``<unk>``/``<s>``/``</s>`` at
    0/1/2), and each level word is one piece so the Q-Align scoring rule applies
    unchanged.

    Args:
        texts: Training text (prompts, descriptions, answers). ``<|image|>`` tags
            and special strings in it are cut out, as ``encode`` would see it.
        vocab_size: Target number of ids, the 259 special and byte pieces
            included. Each word of ``single_token_words`` that training did not
            make one piece adds a few ids beyond it.
        single_token_words: Words that must each encode to a single piece
            (with dummy prefix); by default Q-Align's five level words.
        min_frequency: Minimum count of a pair to be merged.

    Returns:
        The trained tokenizer.

    Raises:
        ValueError: If ``vocab_size`` leaves no room for learnt pieces, or a
            word in ``single_token_words`` is empty or contains a space.
    """
    n_reserved = 3 + _N_BYTE_PIECES
    if vocab_size <= n_reserved + 32:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learnt pieces beside the {n_reserved} special and "
            f"byte pieces; pass vocab_size > {n_reserved + 32} (e.g. 1024)"
        )
    for word in single_token_words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"single_token_words must be non-empty words without spaces; got {word!r}")

    trainer_tokenizer = HFTokenizer(models.BPE())
    _metaspace_pipeline(trainer_tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_reserved,
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=[SPIECE_UNDERLINE],
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_training_chunks(texts, single_token_words), trainer)
    learnt = json.loads(trainer_tokenizer.to_str())["model"]

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(_N_BYTE_PIECES):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [
        tuple(pair) if not isinstance(pair, str) else tuple(pair.split(" ", 1)) for pair in learnt["merges"]
    ]

    # Make each required word one piece: chain merges after the learnt ones, so they
    # apply only once the learnt merges are exhausted, and rebuild after each word so
    # later chains see earlier ones.
    tokenizer = _build_compact(vocab, merges)
    for word in single_token_words:
        pieces = tokenizer.encode(word, add_special_tokens=False).tokens
        if len(pieces) == 1:
            continue
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current = current + piece
            vocab.setdefault(current, len(vocab))
        tokenizer = _build_compact(vocab, merges)
    compact = CompactTokenizer(tokenizer)
    for word in single_token_words:
        compact.word_id(word, strict=True)  # guaranteed by construction; checked, not assumed
    return compact


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a directory, detecting its kind.

    The ``mechbiqa_tokenizer`` field of ``tokenizer_config.json`` decides when
    present. Otherwise a ``tokenizer.model`` (a real checkpoint, read as the
    original slow LLaMA tokenizer) is preferred over a ``tokenizer.json``.

    Args:
        directory: A checkpoint or tokenizer directory.

    Returns:
        A :class:`SentencePieceTokenizer` or :class:`CompactTokenizer`.

    Raises:
        FileNotFoundError: If the directory holds neither file.
        ValueError: If the config names an unknown kind.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {directory} does not exist; pass a checkpoint directory"
        )
    kind = None
    config_path = directory / TOKENIZER_CONFIG
    if config_path.is_file():
        try:
            kind = json.loads(config_path.read_text(encoding="utf-8")).get("mechbiqa_tokenizer")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON ({error}); fix or delete it") from None
    sp_file = directory / SentencePieceTokenizer.model_filename
    json_file = directory / CompactTokenizer.model_filename
    if kind is None:
        if sp_file.is_file():
            kind = SentencePieceTokenizer.kind
        elif json_file.is_file():
            kind = CompactTokenizer.kind
        else:
            raise FileNotFoundError(
                f"no tokenizer in {directory}: expected {sp_file.name} (SentencePiece, real checkpoints) "
                f"or {json_file.name} (compact); save one there with Tokenizer.save()"
            )
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer(sp_file)
    if kind == CompactTokenizer.kind:
        return CompactTokenizer.from_file(json_file)
    raise ValueError(
        f"{config_path} names tokenizer kind {kind!r}; known kinds are "
        f"{SentencePieceTokenizer.kind!r} and {CompactTokenizer.kind!r}"
    )
