"""The recorder on a tiny random model: stored rows equal run_with_cache's at the same positions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.config import IMAGE_TOKEN_INDEX
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, QALIGN_SCORER_PROMPT
from mechbiqa.model.roles import Role, assign_roles
from mechbiqa.model.tokenizer import train_compact_tokenizer
from mechbiqa.store import ActivationStore, CacheSpec, StoreMismatchError
from mechbiqa.store.plan import plan_layout
from mechbiqa.store.record import PromptConfig, RunConfig, SampleSource, record_dataset
from mechbiqa_hooks.cache import to_activation_cache
from mechbiqa_hooks.record import PaddedRows, Recorder
from tests.conftest import randomize_

SPEC = (
    "default; llm.blocks.{l}.attn.hook_q@image; llm.blocks.{l}.hook_resid_post@all; "
    "llm.blocks.{l}.attn.hook_pattern@all:1; llm.hook_modality@all; abstractor.hook_out@all; "
    "llm.blocks.{l}.hook_mlp_out@description:0; llm.ln_final.hook_normalized@last"
)


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_compact_tokenizer(
        [QALIGN_SCORER_PROMPT.replace("<|image|>", ""), "sharp clear vivid blurry", *LEVEL_WORDS],
        vocab_size=300,
    )
    cfg = ModelConfig.tiny()
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=tokenizer.vocab_size))
    model = randomize_(MPLUGOwl2(cfg), seed=1).eval()
    return model, tokenizer, ImageProcessor(image_size=cfg.vision.image_size)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 28, 3), dtype=np.uint8)).save(path)
        out.append(SampleSource(f"img{i}", path, label=i / 5))
    return out


def reference(model, ids, pixels):
    """run_with_cache on one unpadded sample."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), images=pixels[None])
    return cache


def text_ids(spliced: np.ndarray, n: int) -> list[int]:
    """Collapse the stored spliced ids back to text space (one -200 per image block)."""
    out: list[int] = []
    for token in spliced[:n].tolist():
        if token == IMAGE_TOKEN_INDEX and out and out[-1] == IMAGE_TOKEN_INDEX:
            continue
        out.append(token)
    return out


def test_score_mode_rows_equal_run_with_cache(parts, images, tmp_path):
    model, tokenizer, processor = parts
    result = record_dataset(
        model,
        tokenizer,
        processor,
        images,
        CacheSpec.parse(SPEC, dtype="float32"),
        tmp_path / "s.h5",
        run=RunConfig(batch_size=2),
    )
    assert (result.n_recorded, result.n_failed) == (5, 0)
    with ActivationStore.open(result.path) as store:
        prompt = PromptConfig().encode(tokenizer, "score")
        assert store.prompts()[0] == prompt.text == QALIGN_SCORER_PROMPT
        for i, sample in enumerate(images):
            pixels = processor([sample.image_path])[0]
            ids = text_ids(store.token_ids(samples=i), int(store.n_positions(samples=i)))
            assert ids == list(prompt.ids)
            cache = reference(model, ids, pixels)
            roles = store.token_roles(i)
            q = roles.quality_position
            image = roles.positions(Role.IMAGE)
            assert q == len(roles) - 1 and len(image) == model.cfg.n_image_tokens
            for layer in range(model.cfg.llm.n_layers):
                resid = cache[f"llm.blocks.{layer}.hook_resid_post"][0]
                np.testing.assert_allclose(
                    store.get(f"llm.blocks.{layer}.hook_resid_post", samples=i)[0], resid[q], atol=1e-5
                )
                np.testing.assert_allclose(
                    store.get(f"llm.blocks.{layer}.hook_resid_post", "image", samples=i),
                    resid[image],
                    atol=1e-5,
                )
                n = len(roles)
                all_resid = store.get(f"llm.blocks.{layer}.hook_resid_post", "all", samples=i)
                np.testing.assert_allclose(all_resid[:n], resid, atol=1e-5)
                assert not all_resid[n:].any()
                pattern = cache[f"llm.blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
                row = store.get(f"llm.blocks.{layer}.attn.hook_pattern", samples=i)  # [head, 1, key_pos]
                np.testing.assert_allclose(row[:, 0, :n], pattern[:, q], atol=1e-6)
                np.testing.assert_allclose(row[:, 0].sum(-1), 1, atol=1e-5)
                np.testing.assert_allclose(
                    store.get(f"llm.blocks.{layer}.attn.hook_q", "image", samples=i),
                    cache[f"llm.blocks.{layer}.attn.hook_q"][0, image],
                    atol=1e-5,
                )
            full = store.get("llm.blocks.1.attn.hook_pattern", "all", samples=i)  # [head, pos, key_pos]
            np.testing.assert_allclose(full[:, :n, :n], cache["llm.blocks.1.attn.hook_pattern"][0], atol=1e-6)
            np.testing.assert_allclose(
                store.get("llm.unembed.hook_out", samples=i)[0],
                cache["llm.unembed.hook_out"][0, q],
                atol=1e-5,
            )
            np.testing.assert_allclose(
                store.get("llm.ln_final.hook_normalized", "last", samples=i)[0],
                cache["llm.ln_final.hook_normalized"][0, -1],
                atol=1e-5,
            )
            np.testing.assert_array_equal(
                store.get("llm.hook_modality", "all", samples=i)[:n], cache["llm.hook_modality"][0]
            )
            np.testing.assert_allclose(
                store.get("abstractor.hook_out", "all", samples=i), cache["abstractor.hook_out"][0], atol=1e-5
            )
            description = store.positions("description", samples=i)
            described = description[description >= 0]
            np.testing.assert_allclose(
                store.get("llm.blocks.0.hook_mlp_out", "description", samples=i)[: len(described)],
                cache["llm.blocks.0.hook_mlp_out"][0, described],
                atol=1e-5,
            )
        act_cache = to_activation_cache(store, 0, "quality", strip_prefix="llm.")
        assert act_cache["resid_post", 1].shape == (1, 1, model.cfg.llm.d_model)
        np.testing.assert_array_equal(
            act_cache["blocks.1.hook_resid_post"][0].numpy(),
            store.get("llm.blocks.1.hook_resid_post", samples=0),
        )


def test_left_padding_is_undone_for_positions_and_keys(parts, images):
    model, tokenizer, processor = parts
    prompt = PromptConfig().encode(tokenizer, "score")
    n_img = model.cfg.n_image_tokens
    short = list(prompt.ids)
    longer = short[:-1] + tokenizer.encode(" sharp and clear") + short[-1:]
    roles = [
        assign_roles(
            ids, response_start=prompt.response_start, quality_index=len(ids) - 1, n_image_tokens=n_img
        )
        for ids in (short, longer)
    ]
    spec = CacheSpec.parse(
        "llm.blocks.{l}.hook_resid_post@all; llm.blocks.{l}.attn.hook_pattern@quality", dtype="float32"
    )
    layout = plan_layout(model, spec, roles[1], 2)
    width = len(longer)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, ids in enumerate((short, longer)):
        input_ids[b, width - len(ids) :] = torch.tensor(ids)
        mask[b, width - len(ids) :] = 1
    pixels = processor([images[0].image_path, images[1].image_path])
    arrays, _ = Recorder(model, layout).record(PaddedRows(input_ids, mask, roles, [short, longer]), pixels)
    for b, ids in enumerate((short, longer)):
        cache = reference(model, ids, pixels[b])
        n = len(roles[b])
        for layer in range(model.cfg.llm.n_layers):
            np.testing.assert_allclose(
                arrays["llm.blocks.{l}.hook_resid_post@all"][layer, b, :n],
                cache[f"llm.blocks.{layer}.hook_resid_post"][0],
                atol=1e-5,
            )
            row = arrays["llm.blocks.{l}.attn.hook_pattern@quality"][layer, b, :, 0]  # [head, key_pos]
            np.testing.assert_allclose(
                row[:, :n], cache[f"llm.blocks.{layer}.attn.hook_pattern"][0, :, -1], atol=1e-6
            )
            assert not row[:, n:].any()


def test_generate_mode_records_the_answer_and_repeats_with_the_seed(parts, images, tmp_path):
    model, tokenizer, processor = parts
    good = tokenizer.word_id("good")

    def favour_good(logits, hook):  # make the random model say "good" often, so answers have a verdict
        logits[..., good] += 6.0
        return logits

    model.add_hook("llm.unembed.hook_out", favour_good, is_permanent=True)
    try:
        run = RunConfig(mode="generate", batch_size=2, max_new_tokens=6, do_sample=True, seed=3)
        spec = CacheSpec.parse("default; llm.blocks.{l}.hook_resid_post@description", dtype="float32")
        first = record_dataset(model, tokenizer, processor, images, spec, tmp_path / "a.h5", run=run)
        again = record_dataset(model, tokenizer, processor, images, spec, tmp_path / "b.h5", run=run)
        with ActivationStore.open(first.path) as a, ActivationStore.open(again.path) as b:
            assert a.digest() == b.digest()
            answers = a.answers()
            assert all(answers) and any("good" in text for text in answers)
            found = 0
            for i, sample in enumerate(images):
                n = int(a.n_positions(samples=i))
                ids = text_ids(a.token_ids(samples=i), n)
                prompt_len = len(PromptConfig().encode(tokenizer, "generate").ids)
                assert tokenizer.decode(ids[prompt_len:]) == answers[i]
                roles = a.token_roles(i)
                q = roles.quality_position
                if q is None:
                    assert a.counts("quality", samples=i) == 0
                    continue
                found += 1
                assert (
                    ids[len(ids) - (n - q) + 1] == good
                )  # the token after the quality position is the verdict
                cache = reference(model, ids, processor([sample.image_path])[0])
                np.testing.assert_allclose(
                    a.get("llm.blocks.1.hook_resid_post", samples=i)[0],
                    cache["llm.blocks.1.hook_resid_post"][0, q],
                    atol=1e-5,
                )
                described = roles.positions(Role.DESCRIPTION)
                np.testing.assert_allclose(
                    a.get("llm.blocks.0.hook_resid_post", "description", samples=i)[: len(described)],
                    cache["llm.blocks.0.hook_resid_post"][0, described],
                    atol=1e-5,
                )
            assert found >= 2
    finally:
        model.reset_hooks(including_permanent=True)


def test_hooks_are_removed_even_when_the_forward_fails(parts):
    model, tokenizer, _ = parts
    prompt = PromptConfig().encode(tokenizer, "score")
    roles = assign_roles(
        prompt.ids,
        response_start=prompt.response_start,
        quality_index=len(prompt.ids) - 1,
        n_image_tokens=model.cfg.n_image_tokens,
    )
    layout = plan_layout(model, CacheSpec.default(), roles, 1)
    ids = torch.tensor([prompt.ids])
    with pytest.raises(ValueError, match="placeholder"):
        Recorder(model, layout).record(
            PaddedRows(ids, torch.ones_like(ids), [roles], [list(prompt.ids)]), None
        )
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_plan_layout_refuses_unknown_hooks_and_layers(parts):
    model, tokenizer, _ = parts
    prompt = PromptConfig().encode(tokenizer, "score")
    roles = assign_roles(
        prompt.ids,
        response_start=prompt.response_start,
        quality_index=len(prompt.ids) - 1,
        n_image_tokens=model.cfg.n_image_tokens,
    )
    with pytest.raises(ValueError, match="do not exist"):
        plan_layout(model, CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality:7"), roles, 1)
    with pytest.raises(ValueError, match="cannot cache hook"):
        plan_layout(model, CacheSpec.parse("llm.embed_tokens@quality"), roles, 1)


# ----------------------------------------------------------------------------- per-sample prompts
def prompted(tokenizer, n_img):
    """Ragged prompts: with an image (two lengths) or text only (one with its own roles)."""
    from mechbiqa.model.prompts import EncodedPrompt

    base = PromptConfig().encode(tokenizer, "score")
    ids = list(base.ids)
    longer = ids[:-1] + tokenizer.encode(" sharp and clear") + ids[-1:]
    text = [i for i in ids if i != IMAGE_TOKEN_INDEX]  # the same question without the image: stage-2 like
    text_long = text[:-1] + tokenizer.encode(" blurry blurry and noisy") + text[-1:]

    def enc(t, response_start):
        return EncodedPrompt(tokenizer.decode(t), tuple(t), response_start, len(t) - 1)

    a, b = enc(ids, base.response_start), enc(longer, base.response_start)
    c, d = enc(text, base.response_start - 1), enc(text_long, base.response_start - 1)
    own = assign_roles(
        d.ids, response_start=d.response_start, quality_index=d.quality_index, n_image_tokens=n_img
    )
    role = own.role.copy()
    role[3:6] = int(Role.DESCRIPTION)  # roles given by the caller (pipeline: the description in a user turn)
    own = replace(own, role=role)
    return [("c", c, None), ("d", d, own), ("a", a, None), ("c2", c, None), ("b", b, None)]


def test_per_sample_prompts_round_trip_equals_live_forwards(parts, images, tmp_path):
    from mechbiqa.analysis.capture import capture_quality
    from mechbiqa.analysis.lens import LogitLens, lens_from_store
    from mechbiqa.scoring import level_ids
    from mechbiqa.store.record import PromptedSample, record_prompts

    model, tokenizer, processor = parts
    n_img = model.cfg.n_image_tokens
    samples = [
        PromptedSample(sid, prompt, images[i].image_path, roles, label=i / 5, answer=f"answer {sid}")
        for i, (sid, prompt, roles) in enumerate(prompted(tokenizer, n_img))
    ]
    spec = CacheSpec.parse(
        "default; abstractor.hook_out@all; llm.blocks.{l}.attn.hook_pattern@all:1", "float32"
    )
    # batches of 2: text only, then image + text (mixed), then an image alone
    result = record_prompts(model, tokenizer, processor, samples, spec, tmp_path / "p.h5", batch_size=2)
    assert (result.n_recorded, result.n_failed) == (5, 0)
    with ActivationStore.open(result.path) as store:
        assert store.n_images().tolist() == [0, 0, 1, 0, 1]
        assert store.prompts() == [s.prompt.text for s in samples] and store.answers()[1] == "answer d"
        assert len(set(store.n_positions().tolist())) == 4  # ragged
        for i, s in enumerate(samples):
            n = int(store.n_positions(samples=i))
            roles = store.roles(samples=i)
            assert (roles[n:] == int(Role.PAD)).all()
            if s.roles is not None:
                np.testing.assert_array_equal(roles[:n], s.roles.role)  # the caller's roles are stored
            pixels = processor([s.image_path])[0] if s.prompt.n_images else None
            assert text_ids(store.token_ids(samples=i), n) == list(s.prompt.ids)
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    torch.tensor([s.prompt.ids]), images=None if pixels is None else pixels[None]
                )
            q = n - 1
            assert int(store.positions("quality", samples=i)[0]) == q
            assert not (roles[:n] == int(Role.IMAGE)).any() if pixels is None else True
            for layer in range(model.cfg.llm.n_layers):
                np.testing.assert_allclose(
                    store.get(f"llm.blocks.{layer}.hook_resid_post", samples=i)[0],
                    cache[f"llm.blocks.{layer}.hook_resid_post"][0, q],
                    atol=1e-5,
                )
                row = store.get(f"llm.blocks.{layer}.attn.hook_pattern", samples=i)[:, 0]  # [head, key_pos]
                own_row = cache[f"llm.blocks.{layer}.attn.hook_pattern"][0, :, q]
                np.testing.assert_allclose(row[:, :n], own_row, atol=1e-6)
                assert not row[:, n:].any()
            full = store.get("llm.blocks.1.attn.hook_pattern", "all", samples=i)
            np.testing.assert_allclose(full[:, :n, :n], cache["llm.blocks.1.attn.hook_pattern"][0], atol=1e-6)
            image_side = store.get("abstractor.hook_out", "all", samples=i)
            if pixels is None:
                assert not image_side.any()  # a text-only sample has no image tokens to keep
            else:
                np.testing.assert_allclose(image_side, cache["abstractor.hook_out"][0], atol=1e-5)
                image = np.flatnonzero(roles == int(Role.IMAGE))
                assert len(image) == n_img
                np.testing.assert_allclose(
                    store.get("llm.blocks.0.hook_resid_post", "image", samples=i),
                    cache["llm.blocks.0.hook_resid_post"][0, image],
                    atol=1e-5,
                )
            # the lens at the last layer, applied to the stored residual, is the model's own logits
            lens = LogitLens.from_model(model)
            last = model.cfg.llm.n_layers - 1
            resid = torch.from_numpy(store.get(f"llm.blocks.{last}.hook_resid_post", samples=i)[0])
            logits = lens(resid, last)
            np.testing.assert_allclose(logits.numpy(), cache["llm.unembed.hook_out"][0, q], atol=1e-4)
        lens_result = lens_from_store(store, LogitLens.from_model(model), level_ids(tokenizer))
        assert lens_result.last_layer_error < 1e-5 and (lens_result.agreement[-1] == 1.0)
        # the live capture (one padding loop for in-memory studies) sees the same rows
        prompts = [s.prompt for s in samples]
        pixels = processor([s.image_path for s in samples if s.prompt.n_images])
        live = capture_quality(model, prompts, pixels, tokenizer.pad_id, pattern=True, batch_size=3)
        stored = store.get("llm.blocks.{l}.hook_resid_post", "quality")[:, :, 0]
        np.testing.assert_allclose(live.resid, stored, atol=1e-5)
        width = store.layout.max_pos
        np.testing.assert_allclose(
            live.pattern[..., :width],
            store.get("llm.blocks.{l}.attn.hook_pattern", "quality")[:, :, :, 0],
            atol=1e-6,
        )


def test_per_sample_prompts_resume_and_refuse_other_prompts(parts, images, tmp_path):
    from mechbiqa.store import partial_path
    from mechbiqa.store.record import PromptedSample, record_prompts

    model, tokenizer, processor = parts
    samples = [
        PromptedSample(sid, prompt, images[i].image_path, roles, label=i / 5)
        for i, (sid, prompt, roles) in enumerate(prompted(tokenizer, model.cfg.n_image_tokens))
    ]
    spec = CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality; llm.unembed.hook_out@quality", "float32")
    whole = record_prompts(model, tokenizer, processor, samples, spec, tmp_path / "whole.h5", batch_size=2)

    class Killed(Exception):
        pass

    def kill_after_first_batch(done, total):
        if done == 2:
            raise Killed

    path = tmp_path / "resumed.h5"
    with pytest.raises(Killed):
        record_prompts(
            model, tokenizer, processor, samples, spec, path, batch_size=2, progress=kill_after_first_batch
        )
    assert partial_path(path).exists() and not path.exists()
    other = [replace(samples[0], prompt=samples[1].prompt, roles=None), *samples[1:]]
    with pytest.raises(StoreMismatchError, match="prompt"):  # other prompts never append to it
        record_prompts(model, tokenizer, processor, other, spec, path, batch_size=2)
    resumed = record_prompts(model, tokenizer, processor, samples, spec, path, batch_size=2)
    assert (resumed.resumed_from, resumed.n_recorded) == (2, 3)
    with ActivationStore.open(whole.path) as a, ActivationStore.open(resumed.path) as b:
        assert a.digest() == b.digest()
    with pytest.raises(ValueError, match="one image per prompt"):
        two = replace(samples[2].prompt, ids=samples[2].prompt.ids + samples[2].prompt.ids)
        record_prompts(model, tokenizer, processor, [replace(samples[2], prompt=two)], spec, tmp_path / "x")
    with pytest.raises(ValueError, match="roles"):
        wrong = [replace(samples[2], roles=samples[1].roles)]  # a text-only prompt's roles
        record_prompts(model, tokenizer, processor, wrong, spec, tmp_path / "y.h5")


# ----------------------------------------------------------------------------- retrying failed rows
def test_a_fixed_image_is_retried_alone_and_equals_an_uninterrupted_run(parts, images, tmp_path):
    import shutil

    model, tokenizer, processor = parts
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = []
    for s in images:
        shutil.copy(s.image_path, folder / Path(s.image_path).name)
        sources.append(replace(s, image_path=folder / Path(s.image_path).name))
    good = Path(sources[3].image_path).read_bytes()
    Path(sources[3].image_path).write_bytes(good[: len(good) // 3])  # truncated: an error row
    spec = CacheSpec.parse("default; llm.blocks.{l}.hook_resid_post@all", dtype="float32")
    run = RunConfig(batch_size=2)
    first = record_dataset(model, tokenizer, processor, sources, spec, tmp_path / "s.h5", run=run)
    assert (first.n_recorded, first.n_failed) == (5, 1)
    again = record_dataset(model, tokenizer, processor, sources, spec, tmp_path / "s.h5", run=run)
    assert again.n_recorded == 0  # still unreadable: nothing to retry, the store stays as it is
    with ActivationStore.open(tmp_path / "s.h5") as store:
        before = {k: store.get(*k.split("@"), samples="all") for k in store.keys}
    Path(sources[3].image_path).write_bytes(good)  # the image is fixed
    retried = record_dataset(model, tokenizer, processor, sources, spec, tmp_path / "s.h5", run=run)
    assert (retried.n_recorded, retried.n_failed, retried.resumed_from) == (1, 0, 3)
    whole = record_dataset(model, tokenizer, processor, sources, spec, tmp_path / "whole.h5", run=run)
    with ActivationStore.open(retried.path) as store, ActivationStore.open(whole.path) as ref:
        assert store.complete and len(store.valid) == 5 and store.errors() == []
        for key, old in before.items():
            new = store.get(*key.split("@"), samples="all")
            np.testing.assert_array_equal(np.delete(new, 3, 0), np.delete(old, 3, 0))  # others untouched
            # the retried row is computed in its own batch, as an uninterrupted run computes it
            np.testing.assert_array_equal(new[3], ref.get(*key.split("@"), samples="all")[3])
        np.testing.assert_array_equal(store.roles(), ref.roles())
        np.testing.assert_array_equal(store.token_ids(), ref.token_ids())


def test_a_sample_rated_on_retry_gets_its_prompt_and_record(parts, images, tmp_path):
    from mechbiqa.store.record import PromptedSample, record_prompts

    model, tokenizer, processor = parts
    samples = [
        PromptedSample(sid, prompt, images[i].image_path, roles, label=i / 5, record={"n": i})
        for i, (sid, prompt, roles) in enumerate(prompted(tokenizer, model.cfg.n_image_tokens))
    ]
    unrated = [
        *samples[:2],
        PromptedSample("a", None, images[2].image_path, error="cannot rate it"),
        *samples[3:],
    ]
    spec = CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality; llm.unembed.hook_out@quality", "float32")
    path = tmp_path / "p.h5"
    first = record_prompts(model, tokenizer, processor, unrated, spec, path, batch_size=2)
    assert first.n_failed == 1
    retried = record_prompts(model, tokenizer, processor, samples, spec, path, batch_size=2)
    assert (retried.n_recorded, retried.n_failed) == (1, 0)
    whole = record_prompts(model, tokenizer, processor, samples, spec, tmp_path / "w.h5", batch_size=2)
    with ActivationStore.open(path) as store, ActivationStore.open(whole.path) as ref:
        assert store.prompts() == ref.prompts() and store.records()[2] == {"n": 2}
        np.testing.assert_array_equal(store.roles(), ref.roles())
        np.testing.assert_array_equal(
            store.get("llm.blocks.{l}.hook_resid_post")[2], ref.get("llm.blocks.{l}.hook_resid_post")[2]
        )
    with pytest.raises(StoreMismatchError, match="another prompt for sample 'd'"):
        other = [samples[0], replace(samples[1], prompt=samples[0].prompt, roles=None), *samples[2:]]
        record_prompts(model, tokenizer, processor, other, spec, path, batch_size=2)


# ----------------------------------------------------------------------------- identity of a store's model
def test_a_store_refuses_the_lens_and_identity_of_another_model(parts, images, tmp_path):
    from mechbiqa.analysis.lens import LogitLens, lens_from_store
    from mechbiqa.scoring import level_ids
    from mechbiqa.store.identity import model_identity

    model, tokenizer, processor = parts
    spec = CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality", "float32")  # no logits to compare
    result = record_dataset(model, tokenizer, processor, images, spec, tmp_path / "s.h5", model_name="mine")
    other = randomize_(MPLUGOwl2(model.cfg), seed=2).eval()
    with ActivationStore.open(result.path) as store:
        lens_from_store(store, LogitLens.from_model(model), level_ids(tokenizer))
        store.check_identity(model_identity(model))
        refused = (
            r"s\.h5 was recorded from model mine, but the lens comes from theirs, another model .*model mine"
        )
        with pytest.raises(StoreMismatchError, match=refused):
            lens_from_store(store, LogitLens.from_model(other, source="theirs"), level_ids(tokenizer))
        with pytest.raises(
            StoreMismatchError, match=r"s\.h5 was recorded from model mine .*given model theirs"
        ):
            store.check_identity(model_identity(other), model="theirs")


def test_the_readout_fingerprint_of_a_float32_lens_matches_a_bfloat16_recording(parts):
    from mechbiqa.analysis.lens import LogitLens
    from mechbiqa.store.identity import model_identity

    model, _, _ = parts
    half = MPLUGOwl2(model.cfg)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    lens = LogitLens.from_model(model)  # float32, as read from the checkpoint
    assert model_identity(half)["readout"] == lens.readout_fingerprint(torch.bfloat16)
    assert model_identity(model)["readout"] == lens.readout_fingerprint(torch.float32)
    assert model_identity(half)["readout"] != model_identity(model)["readout"]
