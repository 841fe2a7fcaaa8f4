"""The port against the original mPLUG-Owl2 code's outputs on a tiny random model.

Reference: ../shared/fixtures/mplug_owl2_tiny (original code, transformers 4.31, fp32 CPU).
Tolerance 5e-5 max-abs as the fixture prescribes; the abstractor output, the most
sensitive place for the LayerNorm-eps mistake, is held to 5e-6 (the eps mix-up moves it by 6.5e-5).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import mechbiqa
from mechbiqa.scoring import qalign_score
from tests.conftest import TINY_FIXTURE, require

ATOL = 5e-5


@pytest.fixture(scope="module")
def fixture():
    require(TINY_FIXTURE)
    model = mechbiqa.load_pretrained(TINY_FIXTURE, dtype=torch.float32, device="cpu")
    return model, load_file(TINY_FIXTURE / "inputs.safetensors"), load_file(TINY_FIXTURE / "outputs.safetensors")


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@torch.no_grad()
def test_vision_tower_layer_by_layer(fixture):
    model, inp, out = fixture
    last, hidden = model.vision(inp["a.pixel_values"], output_hidden_states=True)
    for i, h in enumerate(hidden):
        close(h, out[f"a.vision.hidden_states.{i}"])
    close(last, out["a.vision.last_hidden_state"])


@torch.no_grad()
def test_abstractor_output_is_tight(fixture):
    model, inp, out = fixture
    close(model.abstractor(out["a.vision.last_hidden_state"]), out["a.abstractor.last_hidden_state"], atol=5e-6)
    close(model.encode_images(inp["a.pixel_values"]), out["a.image_features"], atol=5e-6)


@torch.no_grad()
def test_full_forward_hidden_states_logits_and_modality(fixture):
    model, inp, out = fixture
    o = model(inp["a.input_ids"], images=inp["a.pixel_values"], output_hidden_states=True)
    assert torch.equal(o.modality, out["a.modality_indicators"])
    assert len(o.hidden_states) == model.cfg.llm.n_layers + 1
    close(o.hidden_states[0], out["a.inputs_embeds"])
    for i, h in enumerate(o.hidden_states):
        close(h, out[f"a.llm.hidden_states.{i}"])
    close(o.logits, out["a.logits"])


@torch.no_grad()
def test_qalign_scores(fixture):
    model, inp, out = fixture
    logits = model(inp["a.input_ids"], images=inp["a.pixel_values"]).logits[:, -1]
    close(qalign_score(logits, inp["a.qalign_level_ids"], scale="0-1"), out["a.qalign_score_0to1"], atol=1e-6)
    close(qalign_score(logits, inp["a.qalign_level_ids"], scale="1-5"), out["a.qalign_score_1to5"], atol=4e-6)


@torch.no_grad()
def test_text_only(fixture):
    model, inp, out = fixture
    o = model(inp["b.input_ids"], images=None, output_hidden_states=True)
    assert not o.modality.any()
    for i, h in enumerate(o.hidden_states):
        close(h, out[f"b.llm.hidden_states.{i}"])
    close(o.logits, out["b.logits"])


@torch.no_grad()
def test_greedy_kv_cache_decode(fixture):
    """Case d: prefill, then three cached steps feeding the previous argmax (image passed again, ignored)."""
    model, inp, out = fixture
    ids, pixels = inp["a.input_ids"][:1], inp["a.pixel_values"][:1]
    o = model(ids, images=pixels, use_cache=True)
    cache, logits = o.past_key_values, o.logits[:, -1]
    close(logits, out["d.step0.logits_last"])
    for step in (1, 2, 3):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, images=pixels, past_key_values=cache,
                       attention_mask=torch.ones(1, len(cache) + 1, dtype=torch.long)).logits[:, -1]
        close(logits, out[f"d.step{step}.logits_last"])
    generated = model.generate(ids, images=pixels, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[0, -4:], out["d.generated_tokens"])
    assert torch.equal(generated[:, : ids.shape[1]], ids)


@torch.no_grad()
def test_no_cache_recheck(fixture):
    model, inp, out = fixture
    ids = torch.cat([inp["a.input_ids"][:1], out["d.generated_tokens"][None, :3]], dim=1)
    close(model(ids, images=inp["a.pixel_values"][:1]).logits[:, -1], out["d.nocache.logits_last"])


@torch.no_grad()
def test_original_layout_directory_loads_through_the_public_api(fixture, tmp_path):
    """config.json + model.safetensors under the original names, as a released checkpoint."""
    model, inp, out = fixture
    shutil.copy(TINY_FIXTURE / "config.json", tmp_path / "config.json")
    shutil.copy(TINY_FIXTURE / "weights.safetensors", tmp_path / "model.safetensors")
    again = mechbiqa.load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    close(again(inp["a.input_ids"], images=inp["a.pixel_values"]).logits, out["a.logits"])
