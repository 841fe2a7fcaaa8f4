"""Token roles of every spliced position, on the real prompts and on hand-made ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mechbiqa.model.prompts import (
    MPLUG_OWL2,
    QALIGN_ANSWER_PREFIX,
    QALIGN_QUESTION,
    QALIGN_SCORER,
    QINSTRUCT_QUESTION,
    QINSTRUCT_SCORER,
    encode_answer,
    encode_prompt,
)
from mechbiqa.model.roles import ROLE_LABELS, Role, TokenRoles, assign_roles, pad_batch
from mechbiqa.model.tokenizer import SentencePieceTokenizer

LLAMA_MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "llama2_tokenizer.model"
N_IMAGE = 65  # 64 abstractor queries + 1, as in mPLUG-Owl2


@pytest.fixture(scope="module")
def llama() -> SentencePieceTokenizer:
    if not LLAMA_MODEL.is_file():
        pytest.skip(f"{LLAMA_MODEL} is absent (it lives in ../shared/fixtures beside the repository)")
    return SentencePieceTokenizer(LLAMA_MODEL)


def test_role_values_and_labels() -> None:
    assert [int(r) for r in Role] == list(range(7))
    assert ROLE_LABELS == ("bos", "instruction", "image", "description", "quality", "other", "pad")
    assert Role.QUALITY.label == "quality"


def test_qalign_scorer_roles_every_position(llama: SentencePieceTokenizer) -> None:
    enc = encode_prompt(
        llama, QALIGN_SCORER, QALIGN_QUESTION, image_first=False, answer_prefix=QALIGN_ANSWER_PREFIX
    )
    roles = assign_roles(enc.ids, response_start=enc.response_start, quality_index=enc.quality_index,
                         n_image_tokens=N_IMAGE)  # fmt: skip
    assert len(roles) == 92  # 27 text + 65 image tokens
    assert roles.quality_position == 91
    np.testing.assert_array_equal(roles.positions(Role.IMAGE), np.arange(15, 80))
    np.testing.assert_array_equal(roles.image_index[15:80], np.arange(65))
    assert (roles.image_number[15:80] == 0).all() and (roles.image_number[:15] == -1).all()
    expected = (
        [Role.BOS] + [Role.INSTRUCTION] * 14          # <s> USER: How would ... image?\n
        + [Role.IMAGE] * 65                            # the spliced image
        + [Role.INSTRUCTION] * 6                       # ▁ \n ASS IST ANT :
        + [Role.DESCRIPTION] * 5                       # The quality of the image
        + [Role.QUALITY]                               # is  -> next token: the level word
    )  # fmt: skip
    np.testing.assert_array_equal(roles.role, np.array(expected, dtype=np.int8))
    assert roles.role.dtype == np.int8 and roles.image_index.dtype == np.int16
    assert roles.image_number.dtype == np.int16
    # Every spliced position maps back to the text id it came from.
    assert roles.source_index[91] == 27 and set(roles.source_index[15:80]) == {15}
    assert roles.counts() == {"bos": 1, "instruction": 20, "image": 65, "description": 5, "quality": 1,
                              "other": 0, "pad": 0}  # fmt: skip


def test_qinstruct_scorer_roles(llama: SentencePieceTokenizer) -> None:
    enc = encode_prompt(llama, QINSTRUCT_SCORER, QINSTRUCT_QUESTION, image_first=True, image_sep="")
    roles = assign_roles(enc.ids, response_start=enc.response_start, quality_index=enc.quality_index,
                         n_image_tokens=N_IMAGE)  # fmt: skip
    assert len(roles) == 19 + 65
    np.testing.assert_array_equal(roles.positions(Role.IMAGE), np.arange(5, 70))
    assert roles.quality_position == len(roles) - 1
    assert len(roles.positions(Role.DESCRIPTION)) == 0


def test_teacher_forced_answer_roles(llama: SentencePieceTokenizer) -> None:
    enc = encode_prompt(
        llama, MPLUG_OWL2, QALIGN_QUESTION, image_first=True, answer_prefix=QALIGN_ANSWER_PREFIX
    )
    ids = list(enc.ids) + encode_answer(llama, "good.")  # ▁good . </s>
    roles = assign_roles(ids, response_start=enc.response_start, quality_index=enc.quality_index,
                         n_image_tokens=N_IMAGE)  # fmt: skip
    assert roles.labels()[-4:] == ["quality", "other", "other", "other"]
    assert roles.labels()[:5] == ["bos"] + ["instruction"] * 4  # <s> ▁US ER : ▁
    assert roles.labels()[5:70] == ["image"] * 65


def test_open_prompt_without_quality() -> None:
    ids = [1, 10, 11, -200, 12, 13, 14, 15, 2]
    roles = assign_roles(ids, response_start=6, quality_index=None, n_image_tokens=3)
    assert roles.labels() == ["bos", "instruction", "instruction", "image", "image", "image",
                              "instruction", "instruction", "other", "other", "other"]  # fmt: skip
    assert roles.quality_position is None


def test_several_images_and_per_image_counts() -> None:
    ids = [1, 10, -200, 11, -200, 12, 13]
    roles = assign_roles(ids, response_start=6, quality_index=6, n_image_tokens=[2, 4])
    assert len(roles) == 5 + 6
    assert roles.n_images == 2
    np.testing.assert_array_equal(roles.image_positions(0), [2, 3])
    np.testing.assert_array_equal(roles.image_positions(1), [5, 6, 7, 8])
    np.testing.assert_array_equal(roles.image_index[5:9], [0, 1, 2, 3])
    assert roles.quality_position == 10


def test_bos_only_at_position_zero() -> None:
    roles = assign_roles([5, 1, 6], response_start=3, quality_index=None, n_image_tokens=65)
    assert roles.labels() == ["instruction", "instruction", "instruction"]


def test_padding() -> None:
    roles = assign_roles([1, 10, -200, 11], response_start=4, quality_index=3, n_image_tokens=2)
    left = roles.left_pad(2)
    assert left.labels() == ["pad", "pad", "bos", "instruction", "image", "image", "quality"]
    assert left.quality_position == 6 and (left.image_index[:2] == -1).all()
    assert (left.source_index[:2] == -1).all()
    right = roles.right_pad(1)
    assert right.labels()[-1] == "pad" and right.quality_position == 4
    batch = pad_batch([roles, roles.right_pad(3)], side="left")
    assert [len(r) for r in batch] == [8, 8] and batch[0].labels()[:3] == ["pad"] * 3
    with pytest.raises(ValueError, match="n >= 0"):
        roles.left_pad(-1)


def test_arrays_are_read_only() -> None:
    roles = assign_roles([1, 10], response_start=2, quality_index=1, n_image_tokens=65)
    assert isinstance(roles, TokenRoles)
    with pytest.raises(ValueError):
        roles.role[0] = 3


def test_refusals() -> None:
    with pytest.raises(ValueError, match="one count per placeholder"):
        assign_roles([1, -200, -200, 5], response_start=4, quality_index=3, n_image_tokens=[65])
    with pytest.raises(ValueError, match="image placeholder"):
        assign_roles([1, 5, -200], response_start=3, quality_index=2, n_image_tokens=65)
    with pytest.raises(ValueError, match="quality_index"):
        assign_roles([1, 5], response_start=2, quality_index=2, n_image_tokens=65)
    with pytest.raises(ValueError, match="response_start"):
        assign_roles([1, 5], response_start=3, quality_index=None, n_image_tokens=65)
    with pytest.raises(ValueError, match="positive"):
        assign_roles([1, -200], response_start=2, quality_index=None, n_image_tokens=0)
