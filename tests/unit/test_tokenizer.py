"""Tokenizers against independent references: the fact sheet's ids, sentencepiece, transformers.

The real LLaMA-2 model is read from ../shared/fixtures; tests that need it skip
with the reason when it is absent.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from mechbiqa.model.tokenizer import (
    IMAGE_TAG,
    CompactTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_compact_tokenizer,
)

SHARED_FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
LLAMA_MODEL = SHARED_FIXTURES / "llama2_tokenizer.model"

# Fact sheet §10 (computed with transformers 4.31 LlamaTokenizer, slow): Q-Align's rule input_ids[1].
LEVEL_IDS = {"excellent": 15129, "good": 1781, "fair": 6534, "poor": 6460, "bad": 4319}
EVAL_WORD_IDS = {
    "good": 1781, "poor": 6460, "high": 1880, "fair": 6534, "low": 4482, "excellent": 15129, "bad": 4319,
    "fine": 2691, "moderate": 17768, "decent": 27189, "average": 6588, "medium": 18350, "acceptable": 22691,
}  # fmt: skip

# Chunks whose ids the fact sheet lists (with their SentencePiece pieces), plus tricky whitespace.
CHUNKS = {
    "USER: How would you rate the quality of this image?\n": [
        3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13,
    ],
    "\nASSISTANT: The quality of the image is": [
        29871, 13, 22933, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338,
    ],
    " ASSISTANT: The quality of the image is": [
        29871, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338,
    ],
    "Rate the quality of the image.\nASSISTANT: ": [
        390, 403, 278, 11029, 310, 278, 1967, 29889, 13, 22933, 9047, 13566, 29901, 29871,
    ],
    "USER: ": [3148, 1001, 29901, 29871],
}  # fmt: skip

TRICKY = [
    "", " ", "  a", "hello  world", "a\n\nb", "good </s> USER", "ASSISTANT: good.</s>USER: hi", "a<s>b",
    "<unk>x", "héllo wörld ☃ 日本", "The quality of the image is excellent.</s>", "\t tab", "12345 67",
]  # fmt: skip

BENCH_TEXT = [
    "USER: <|image|>\nHow would you rate the quality of this image? "
    "ASSISTANT: The quality of the image is good.</s>",
    "The image is slightly blurred; fine textures are lost, colours are natural. "
    "The quality of the image is fair.",
    "Strong Gaussian noise covers the whole picture and edges are hard to see. The quality is poor.",
    "The photo is sharp, well exposed, with vivid colours. Its quality is excellent.",
    "Heavy JPEG blocking and colour banding make the picture look bad.",
] * 20


@pytest.fixture(scope="module")
def llama() -> SentencePieceTokenizer:
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"{LLAMA_MODEL} is absent (it lives in ../shared/fixtures beside the repository)")
    return SentencePieceTokenizer(LLAMA_MODEL)


@pytest.fixture(scope="module")
def compact() -> CompactTokenizer:
    return train_compact_tokenizer(BENCH_TEXT, vocab_size=420)


# ----------------------------------------------------------------------------- real tokenizer
def test_llama_special_ids_and_size(llama: SentencePieceTokenizer) -> None:
    assert (llama.unk_id, llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, 2, 0)
    assert llama.vocab_size == 32000
    assert llama.id_to_piece(29871) == "▁" and llama.id_to_piece(13) == "<0x0A>"
    assert isinstance(llama, Tokenizer)


@pytest.mark.parametrize("word", sorted(EVAL_WORD_IDS))
def test_llama_word_ids_follow_qalign_rule(llama: SentencePieceTokenizer, word: str) -> None:
    assert llama.word_id(word) == EVAL_WORD_IDS[word]


def test_llama_level_words_are_single_pieces(llama: SentencePieceTokenizer) -> None:
    for word, expected in LEVEL_IDS.items():
        assert llama.word_id(word, strict=True) == expected
        assert llama.id_to_piece(expected) == "▁" + word
    with pytest.raises(ValueError, match="moderate"):
        llama.word_id("moderate", strict=True)
    with pytest.raises(ValueError, match="empty"):
        llama.word_id("")


@pytest.mark.parametrize("text", sorted(CHUNKS))
def test_llama_chunks_match_fact_sheet(llama: SentencePieceTokenizer, text: str) -> None:
    assert llama.encode(text) == CHUNKS[text]


def test_llama_special_strings_split_like_slow_legacy(llama: SentencePieceTokenizer) -> None:
    # The slow tokenizer (legacy) cuts special strings out and encodes each piece with its dummy prefix.
    assert llama.encode("good </s> USER") == [1781, 29871, 2, 29871, 3148, 1001]
    assert llama.encode("excellent.</s>") == [15129, 29889, 2]


def test_llama_decode_skips_specials_and_placeholder(llama: SentencePieceTokenizer) -> None:
    ids = [1, *llama.encode("The quality\nis good."), 2, -200]
    assert llama.decode(ids) == "The quality\nis good."
    assert llama.decode([-200, 1, 2, 0]) == ""


def test_encode_refuses_image_tag(llama: SentencePieceTokenizer) -> None:
    with pytest.raises(ValueError, match="tokenize_prompt"):
        llama.encode(f"USER: {IMAGE_TAG}")


def test_llama_equals_sentencepiece_package(llama: SentencePieceTokenizer) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    for text in TRICKY + list(CHUNKS):
        if any(s in text for s in ("<s>", "</s>", "<unk>")):
            continue
        assert llama.encode(text) == sp.encode(text), text


def test_llama_equals_transformers_sentencepiece_backend(llama: SentencePieceTokenizer) -> None:
    """Transformers 5 dropped the slow LlamaTokenizer; its SentencePieceBackend (legacy) is the slow path.

    ``LlamaTokenizer`` in transformers 5 is a converted BPE model: built with
    ``vocab_file=`` it silently has an empty vocabulary, and from a directory
    it differs from SentencePiece on runs of spaces (``" ASSISTANT:"`` loses its
    leading 29871), so it cannot serve as the reference.
    """
    backend_module = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    try:
        reference = backend_module.SentencePieceBackend(
            vocab_file=str(LLAMA_MODEL), legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    except Exception as error:  # an API change in transformers: say so instead of failing
        pytest.skip(f"transformers' SentencePieceBackend cannot be built here: {error}")
    for text in TRICKY + list(CHUNKS):
        assert llama.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_llama_save_load_and_pickle(llama: SentencePieceTokenizer, tmp_path: Path) -> None:
    llama.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["mechbiqa_tokenizer"] == "sentencepiece"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer)
    clone = pickle.loads(pickle.dumps(llama))
    for text in TRICKY:
        assert loaded.encode(text) == llama.encode(text) == clone.encode(text)


def test_load_real_checkpoint_layout_without_kind(llama: SentencePieceTokenizer, tmp_path: Path) -> None:
    # A real checkpoint: tokenizer.model and an HF tokenizer_config.json without our field.
    (tmp_path / "tokenizer.model").write_bytes(LLAMA_MODEL.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


# ----------------------------------------------------------------------------- compact tokenizer
def test_compact_layout_matches_llama_specials(compact: CompactTokenizer) -> None:
    assert (compact.unk_id, compact.bos_id, compact.eos_id, compact.pad_id) == (0, 1, 2, 0)
    assert [compact.id_to_piece(i) for i in (0, 1, 2, 3, 13, 258)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>",
    ]  # fmt: skip
    assert 380 <= compact.vocab_size <= 440


def test_compact_level_words_are_single_word_start_pieces(compact: CompactTokenizer) -> None:
    ids = [compact.word_id(w, strict=True) for w in LEVEL_IDS]
    assert len(set(ids)) == 5
    assert [compact.id_to_piece(i) for i in ids] == ["▁" + w for w in LEVEL_IDS]
    # In running text the verdict word is the same piece as word_id gives.
    assert compact.encode("The quality of the image is excellent.")[-2] == ids[0]


def test_compact_rare_words_become_single_pieces_even_if_unseen() -> None:
    tok = train_compact_tokenizer(["some short text about images"] * 5, vocab_size=300,
                                  single_token_words=("excellent", "mediocre"))  # fmt: skip
    assert tok.id_to_piece(tok.word_id("mediocre", strict=True)) == "▁mediocre"


def test_compact_dummy_prefix_like_sentencepiece(compact: CompactTokenizer) -> None:
    lone = compact.piece_to_id("▁")
    assert compact.encode("") == []
    # A chunk starting with a space or a newline begins with a lone "▁", as in SentencePiece.
    assert compact.encode(" ASSISTANT:")[0] == lone
    assert compact.id_to_piece(compact.encode("\nASSISTANT:")[0]).startswith("▁")
    assert compact.encode("good")[0] == compact.word_id("good")
    # Special strings are cut out and each remaining piece gets its own prefix.
    assert compact.encode("good </s> USER")[:3] == [compact.word_id("good"), lone, 2]


def test_compact_byte_fallback_and_round_trip(compact: CompactTokenizer) -> None:
    for text in TRICKY:
        ids = compact.encode(text)
        assert compact.unk_id not in ids or "<unk>" in text
        expected = text.replace("</s>", "").replace("<s>", "").replace("<unk>", "")
        if not any(s in text for s in ("<s>", "</s>", "<unk>")) and not text.startswith(" "):
            assert compact.decode(ids) == expected, text
    assert "<0xE2>" in [compact.id_to_piece(i) for i in compact.encode("☃")]


def test_compact_save_load_pickle(compact: CompactTokenizer, tmp_path: Path) -> None:
    compact.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["mechbiqa_tokenizer"] == "compact"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CompactTokenizer)
    clone = pickle.loads(pickle.dumps(compact))
    assert loaded.vocab_size == clone.vocab_size == compact.vocab_size
    for text in TRICKY + BENCH_TEXT[:5]:
        if IMAGE_TAG in text:
            continue
        assert loaded.encode(text) == compact.encode(text) == clone.encode(text)


def test_compact_training_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_compact_tokenizer(["text"], vocab_size=200)
    with pytest.raises(ValueError, match="single_token_words"):
        train_compact_tokenizer(["text"], vocab_size=400, single_token_words=("very good",))


# ----------------------------------------------------------------------------- loader errors
def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mechbiqa_tokenizer": "wordpiece"}))
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bad)
