"""Prompts: exact strings and ids of the original scorers, templates, chunked tokenization."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechbiqa.model.prompts import (
    IMAGE_TOKEN_ID,
    LEVEL_WORDS,
    MPLUG_OWL2,
    QALIGN_ANSWER_PREFIX,
    QALIGN_EVAL_PROMPT,
    QALIGN_QUESTION,
    QALIGN_SCORER,
    QALIGN_SCORER_PROMPT,
    QALIGN_TRAIN_QUESTION,
    QINSTRUCT_EVAL_PROMPT,
    QINSTRUCT_QUESTION,
    QINSTRUCT_SCORER,
    QINSTRUCT_SCORER_PROMPT,
    V1,
    EncodedPrompt,
    encode_answer,
    encode_prompt,
    find_quality_index,
    get_template,
    qalign_scorer_prompt,
    tokenize_prompt,
)
from mechbiqa.model.tokenizer import SentencePieceTokenizer, train_compact_tokenizer

LLAMA_MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "llama2_tokenizer.model"

# Fact sheet §10, computed with the original slow LlamaTokenizer.
QALIGN_IDS = [
    1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200,
    29871, 13, 22933, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338,
]  # fmt: skip
QINSTRUCT_IDS = [
    1, 3148, 1001, 29901, 29871, -200, 390, 403, 278, 11029, 310, 278, 1967, 29889, 13, 22933, 9047,
    13566, 29901, 29871,
]  # fmt: skip

OWL2_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def llama() -> SentencePieceTokenizer:
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"{LLAMA_MODEL} is absent (it lives in ../shared/fixtures beside the repository)")
    return SentencePieceTokenizer(LLAMA_MODEL)


# ----------------------------------------------------------------------------- templates as text
def test_mplug_owl2_template_drops_system_and_follows_get_prompt() -> None:
    assert MPLUG_OWL2.system == OWL2_SYSTEM and not MPLUG_OWL2.emit_system
    two_turns = MPLUG_OWL2.render([("USER", "q1"), ("ASSISTANT", "a1"), ("USER", "q2"), ("ASSISTANT", None)])
    assert two_turns == "USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"


def test_v1_template_emits_system_sentence() -> None:
    text = V1.prompt("<|image|>\n" + QALIGN_TRAIN_QUESTION)
    assert text == V1_SYSTEM + " USER: <|image|>\nWhat is your quality rating for this image? ASSISTANT:"
    full = V1.render(
        [
            ("USER", "<|image|>\n" + QALIGN_TRAIN_QUESTION),
            ("ASSISTANT", "The quality of the image is excellent."),
        ]
    )
    # The One-Align training sample of the fact sheet, in full.
    assert full.endswith("? ASSISTANT: The quality of the image is excellent.</s>")
    assert get_template("vicuna_v1") is V1
    with pytest.raises(KeyError, match="known"):
        get_template("llava")


def test_scorer_templates_render_the_hard_coded_strings() -> None:
    assert QALIGN_SCORER.prompt(QALIGN_QUESTION + "\n<|image|>", QALIGN_ANSWER_PREFIX) == QALIGN_SCORER_PROMPT
    assert MPLUG_OWL2.prompt(QALIGN_QUESTION + "\n<|image|>", QALIGN_ANSWER_PREFIX) == QALIGN_EVAL_PROMPT
    assert QINSTRUCT_SCORER.prompt("<|image|>" + QINSTRUCT_QUESTION) == QINSTRUCT_SCORER_PROMPT
    assert MPLUG_OWL2.prompt("<|image|>" + QINSTRUCT_QUESTION) == QINSTRUCT_EVAL_PROMPT
    assert qalign_scorer_prompt() == QALIGN_SCORER_PROMPT
    assert qalign_scorer_prompt("aesthetics", "video") == (
        "USER: How would you rate the aesthetics of this video?\n<|image|>\n"
        "ASSISTANT: The aesthetics of the video is"
    )


# ----------------------------------------------------------------------------- ids, real tokenizer
def test_qalign_scorer_prompt_ids(llama: SentencePieceTokenizer) -> None:
    assert tokenize_prompt(llama, QALIGN_SCORER_PROMPT) == QALIGN_IDS
    assert len(QALIGN_IDS) == 28


def test_qinstruct_scorer_prompt_ids(llama: SentencePieceTokenizer) -> None:
    assert tokenize_prompt(llama, QINSTRUCT_SCORER_PROMPT) == QINSTRUCT_IDS
    assert len(QINSTRUCT_IDS) == 20


def test_qalign_eval_variant_has_space_before_assistant(llama: SentencePieceTokenizer) -> None:
    ids = tokenize_prompt(llama, QALIGN_EVAL_PROMPT)
    assert ids[:16] == QALIGN_IDS[:16]
    assert ids[16:22] == [29871, 319, 1799, 9047, 13566, 29901]  # "▁ ▁A SS IST ANT :"
    assert ids[22:] == QALIGN_IDS[22:]


def test_tokenize_prompt_equals_original_algorithm(llama: SentencePieceTokenizer) -> None:
    """A literal transcription of tokenizer_image_token over a slow-tokenizer stand-in."""

    def original_tokenizer(chunk: str) -> list[int]:  # tokenizer(chunk).input_ids: BOS + ids
        return [1, *llama.encode(chunk)]

    def tokenizer_image_token(prompt: str) -> list[int]:
        chunks = [original_tokenizer(c) for c in prompt.split("<|image|>")]

        def insert_separator(x, sep):
            return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

        input_ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == 1:
            offset = 1
            input_ids.append(chunks[0][0])
        for x in insert_separator(chunks, [-200] * (offset + 1)):
            input_ids.extend(x[offset:])
        return input_ids

    prompts = [
        QALIGN_SCORER_PROMPT, QALIGN_EVAL_PROMPT, QINSTRUCT_SCORER_PROMPT, QINSTRUCT_EVAL_PROMPT,
        "USER: The first image: <|image|> The second image: <|image|> Which is sharper? ASSISTANT:",
        "<|image|>", "<|image|><|image|>\n", "no image at all",
    ]  # fmt: skip
    for prompt in prompts:
        assert tokenize_prompt(llama, prompt) == tokenizer_image_token(prompt), prompt


def test_tokenize_prompt_checks_image_count(llama: SentencePieceTokenizer) -> None:
    with pytest.raises(ValueError, match="0 '<|image|>' tag"):
        tokenize_prompt(llama, "USER: Rate the quality. ASSISTANT:", n_images=1)
    assert tokenize_prompt(llama, QALIGN_SCORER_PROMPT, n_images=1) == QALIGN_IDS


# ----------------------------------------------------------------------------- encode_prompt
def test_encode_prompt_qalign_scorer(llama: SentencePieceTokenizer) -> None:
    enc = encode_prompt(
        llama, QALIGN_SCORER, QALIGN_QUESTION, image_first=False, answer_prefix=QALIGN_ANSWER_PREFIX
    )
    assert enc.text == QALIGN_SCORER_PROMPT
    assert list(enc.ids) == QALIGN_IDS
    assert enc.response_start == 22 and enc.ids[22] == 450  # "▁The" opens the answer
    assert enc.quality_index == 27 and enc.ids[27] == 338  # "▁is": its logits choose the level word
    assert enc.n_images == 1 and len(enc) == 28


def test_encode_prompt_qinstruct_scorer(llama: SentencePieceTokenizer) -> None:
    enc = encode_prompt(llama, QINSTRUCT_SCORER, QINSTRUCT_QUESTION, image_first=True, image_sep="")
    assert enc.text == QINSTRUCT_SCORER_PROMPT
    assert list(enc.ids) == QINSTRUCT_IDS
    # The answer is still empty: it starts at the trailing "▁", which is also the quality position.
    assert enc.response_start == enc.quality_index == 19


def test_encode_prompt_eval_variants(llama: SentencePieceTokenizer) -> None:
    qalign = encode_prompt(
        llama, MPLUG_OWL2, QALIGN_QUESTION, image_first=False, answer_prefix=QALIGN_ANSWER_PREFIX
    )
    assert qalign.text == QALIGN_EVAL_PROMPT and qalign.quality_index == len(qalign) - 1
    qinstruct = encode_prompt(llama, MPLUG_OWL2, QINSTRUCT_QUESTION, image_first=True, image_sep="")
    assert qinstruct.text == QINSTRUCT_EVAL_PROMPT
    assert qinstruct.response_start == len(qinstruct)  # nothing of the answer yet
    assert qinstruct.quality_index == len(qinstruct) - 1  # the ":" of "ASSISTANT:"


def test_encode_prompt_training_sample_matches_whole_string(llama: SentencePieceTokenizer) -> None:
    answer = "The quality of the image is excellent."
    prompt = encode_prompt(llama, V1, QALIGN_TRAIN_QUESTION, image_first=True, scores_quality=False)
    assert prompt.quality_index is None and prompt.response_start == len(prompt)
    whole = V1.render([("USER", "<|image|>\n" + QALIGN_TRAIN_QUESTION), ("ASSISTANT", answer)])
    ids = list(prompt.ids) + encode_answer(llama, answer)
    assert ids == tokenize_prompt(llama, whole)
    assert ids[-1] == llama.eos_id
    quality = find_quality_index(
        ids, [llama.word_id(w) for w in LEVEL_WORDS], response_start=prompt.response_start
    )
    assert ids[quality + 1] == 15129 and llama.decode(ids[prompt.response_start : quality + 1]).endswith(
        "image is"
    )


def test_encode_prompt_description_before_prefix(llama: SentencePieceTokenizer) -> None:
    description = "The image is sharp, though the sky is a bit noisy."
    enc = encode_prompt(
        llama, MPLUG_OWL2, QALIGN_QUESTION, image_first=True, description=description,
        answer_prefix=QALIGN_ANSWER_PREFIX,
    )  # fmt: skip
    assert enc.text.endswith("ASSISTANT: " + description + " " + QALIGN_ANSWER_PREFIX)
    assert llama.decode(enc.ids[enc.response_start :]) == description + " " + QALIGN_ANSWER_PREFIX
    assert llama.decode(enc.ids[: enc.response_start]).endswith("ASSISTANT:")


def test_encode_prompt_text_only_and_several_images(llama: SentencePieceTokenizer) -> None:
    text_only = encode_prompt(llama, MPLUG_OWL2, "Rate this description.", image_first=True, n_images=0,
                              answer_prefix=QALIGN_ANSWER_PREFIX)  # fmt: skip
    assert text_only.n_images == 0 and -200 not in text_only.ids
    two = encode_prompt(llama, MPLUG_OWL2, "Compare them.", image_first=True, n_images=2)
    assert two.n_images == 2 and two.text.startswith("USER: <|image|><|image|>\nCompare")


def test_encode_prompt_refusals(llama: SentencePieceTokenizer) -> None:
    with pytest.raises(ValueError, match="places the tags itself"):
        encode_prompt(llama, MPLUG_OWL2, "<|image|>Rate it.", image_first=True)
    with pytest.raises(ValueError, match="answer_prefix"):
        encode_prompt(llama, MPLUG_OWL2, "Rate it.", image_first=True, answer_prefix="see <|image|>")
    with pytest.raises(ValueError, match="negative"):
        encode_prompt(llama, MPLUG_OWL2, "Rate it.", image_first=True, n_images=-1)
    with pytest.raises(ValueError, match="image placeholder"):
        EncodedPrompt(text="<|image|>", ids=(1, -200), response_start=2, quality_index=1)
    with pytest.raises(ValueError, match="empty answer"):
        encode_answer(llama, "")


def test_find_quality_index_takes_last_level_word() -> None:
    good, poor = 1781, 6460
    ids = [1, 5, 6, 7, good, 8, 9, poor, 2]
    assert find_quality_index(ids, [good, poor], response_start=3) == 6
    assert find_quality_index(ids[:7], [good, poor], response_start=3) == 3
    assert find_quality_index(ids, [12345], response_start=3) is None


# ----------------------------------------------------------------------------- compact tokenizer
def test_same_code_with_compact_tokenizer() -> None:
    texts = [QALIGN_SCORER_PROMPT + " good.", QINSTRUCT_SCORER_PROMPT + "poor", "The image is blurry."] * 10
    tok = train_compact_tokenizer(texts, vocab_size=330)
    enc = encode_prompt(
        tok, QALIGN_SCORER, QALIGN_QUESTION, image_first=False, answer_prefix=QALIGN_ANSWER_PREFIX
    )
    ids = list(enc.ids)
    assert ids[0] == 1 and ids.count(-200) == 1
    # The "\nASSISTANT" chunk gets the dummy prefix, as with SentencePiece.
    assert tok.id_to_piece(ids[ids.index(-200) + 1]).startswith("▁\n") or ids[
        ids.index(-200) + 1
    ] == tok.piece_to_id("▁")
    assert tok.decode(ids[enc.response_start :]) == QALIGN_ANSWER_PREFIX
    assert tok.decode([*ids, tok.word_id("good")]).endswith("The quality of the image is good")
