"""Checkpoint directories in the original layout: names, round trips, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mechbiqa
from mechbiqa.model import CheckpointError, ModelConfig, MPLUGOwl2
from mechbiqa.model.load import to_original, to_ours
from tests.conftest import REPO, TINY_FIXTURE, require

KEYS_7B = REPO.parent / "shared" / "reference" / "mplug_owl2_7b_keys.txt"
IMG = -200


def test_7b_key_names_and_shapes_match_the_original():
    rows = [line.split("\t") for line in require(KEYS_7B).read_text().splitlines() if line.strip()]
    original = {k: json.loads(shape) for k, shape in rows if not k.endswith("inv_freq")}
    with torch.device("meta"):
        model = MPLUGOwl2(ModelConfig.llama2_7b())
    ours = {to_original(k): list(v.shape) for k, v in model.state_dict().items()}
    assert ours == original
    assert all(to_ours(to_original(k)) == k for k in model.state_dict())
    assert model.cfg.n_image_tokens == 65


def test_hf_config_round_trip(tmp_path):
    cfg = ModelConfig.from_json(require(TINY_FIXTURE) / "config.json")
    assert cfg.vision.grid == 3 and cfg.n_image_tokens == 4 and cfg.llm.n_layers == 3
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg


def logits(model: MPLUGOwl2) -> torch.Tensor:
    size = model.cfg.vision.image_size
    ids = torch.tensor([[1, 7, IMG, 9, 4]])
    with torch.no_grad():
        return model(ids, images=torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))).logits


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_round_trip(tiny_model, tmp_path, layout):
    ref = logits(tiny_model)
    if layout == "safetensors":
        mechbiqa.save_pretrained(tiny_model, tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    elif layout == "sharded":
        mechbiqa.save_pretrained(tiny_model, tmp_path, max_shard_bytes=20_000)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    else:
        tiny_model.cfg.to_json(tmp_path / "config.json")
        state = {to_original(k): v for k, v in tiny_model.state_dict().items()}
        if layout == "bin":
            torch.save(state, tmp_path / "pytorch_model.bin")
        else:
            keys = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for name, part in halves.items():
                torch.save({k: state[k] for k in part}, tmp_path / name)
            weight_map = {k: name for name, part in halves.items() for k in part}
            (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    again = mechbiqa.load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert torch.equal(logits(again), ref)


def test_loads_in_bf16_built_on_meta(tiny_model, tmp_path, monkeypatch):
    mechbiqa.save_pretrained(tiny_model, tmp_path)
    devices = []
    original_setup = MPLUGOwl2.setup

    def spy(self):
        devices.append(self.llm.embed.weight.device.type)
        return original_setup(self)

    monkeypatch.setattr(MPLUGOwl2, "setup", spy)
    model = mechbiqa.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert devices == ["meta"]  # nothing was allocated in fp32 before the weights came in
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_inv_freq_ignored_and_pos_tables_recomputed(tmp_path):
    shutil.copy(require(TINY_FIXTURE) / "config.json", tmp_path / "config.json")
    state = load_file(TINY_FIXTURE / "weights.safetensors")
    assert any(k.endswith("inv_freq") for k in state)
    tables = {k: v for k, v in state.items() if k.endswith("pos_embed")}
    save_file({k: v for k, v in state.items() if not k.endswith("pos_embed")}, str(tmp_path / "model.safetensors"))
    model = mechbiqa.load_pretrained(tmp_path)
    for key, table in tables.items():
        assert (model.state_dict()[to_ours(key)] - table).abs().max() < 1e-7


def broken_copy(tiny_model, tmp_path, edit):
    mechbiqa.save_pretrained(tiny_model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_key_is_named(tiny_model, tmp_path):
    path = broken_copy(tiny_model, tmp_path, lambda s: s.pop("model.layers.1.self_attn.v_proj.multiway.1.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.layers\.1\.self_attn\.v_proj\.multiway\.1"):
        mechbiqa.load_pretrained(path)


def test_renamed_key_is_named_both_ways(tiny_model, tmp_path):
    def rename(s):
        s["model.layers.0.self_attn.k_proj.weight"] = s.pop("model.layers.0.self_attn.k_proj.multiway.0.weight")

    with pytest.raises(CheckpointError) as err:
        mechbiqa.load_pretrained(broken_copy(tiny_model, tmp_path, rename))
    assert "missing keys (1): model.layers.0.self_attn.k_proj.multiway.0.weight" in str(err.value)
    assert "unexpected keys (1): model.layers.0.self_attn.k_proj.weight" in str(err.value)


def test_wrong_shape_is_named(tiny_model, tmp_path):
    def shrink(s):
        s["lm_head.weight"] = s["lm_head.weight"][:10]

    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): lm_head\.weight: checkpoint \[10, 32\]"):
        mechbiqa.load_pretrained(broken_copy(tiny_model, tmp_path, shrink))


def test_missing_config_and_non_checkpoints_are_refused(tiny_model, tmp_path):
    mechbiqa.save_pretrained(tiny_model, tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mechbiqa.load_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    tiny_model.cfg.to_json(tmp_path / "b" / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        mechbiqa.load_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        mechbiqa.load_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict .*corrupt or truncated"):
        mechbiqa.load_pretrained(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not an mPLUG-Owl2 config"):
        mechbiqa.load_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a directory"):
        mechbiqa.load_pretrained(tmp_path / "nowhere")


def test_legacy_bin_loads_and_a_pickle_payload_is_still_refused(tiny_model, tmp_path):
    state = {to_original(k): v for k, v in tiny_model.state_dict().items()}
    (tmp_path / "legacy").mkdir()
    tiny_model.cfg.to_json(tmp_path / "legacy" / "config.json")
    torch.save(state, tmp_path / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = mechbiqa.load_pretrained(tmp_path / "legacy")
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil").mkdir()
    tiny_model.cfg.to_json(tmp_path / "evil" / "config.json")
    torch.save({"x": Payload()}, tmp_path / "evil" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    # one sentence naming the call it would make, not torch's advice to load it with weights_only=False
    payload = r"holds Python objects besides tensors \(it would call (builtins\.)?print when loaded\)"
    with pytest.raises(CheckpointError, match=payload) as info:
        mechbiqa.load_pretrained(tmp_path / "evil")
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    # a truncated legacy file: corrupt, not blamed on mmap or pickles
    whole = (tmp_path / "legacy" / "pytorch_model.bin").read_bytes()
    (tmp_path / "legacy" / "pytorch_model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        mechbiqa.load_pretrained(tmp_path / "legacy")
    assert "mmap" not in str(info.value)


def test_weight_bytes_counts_every_shard_of_every_stage_through_linked_versions(tiny_model, tmp_path):
    """What decides whether checkpoints may be opened side by side: their weights' size on disk."""
    from mechbiqa.checkpoint import weight_bytes

    one = mechbiqa.save_pretrained(tiny_model, tmp_path / "one", max_shard_bytes=20_000)
    shards = sorted(one.glob("*.safetensors"))
    tensors = [t for s in shards for t in load_file(str(s)).values()]
    held = sum(t.numel() * t.element_size() for t in tensors)  # the tensors themselves
    single = weight_bytes(one)
    assert len(shards) > 2 and held <= single < held + 1_000 * len(tensors)  # plus each shard's small header
    pair = tmp_path / "pair"
    for stage in ("stage1", "stage2"):  # each stage a link to its version directory, as training publishes
        shutil.copytree(one, tmp_path / f".{stage}.v1")
        pair.mkdir(exist_ok=True)
        (pair / stage).symlink_to(tmp_path / f".{stage}.v1")
    assert weight_bytes(pair) == 2 * single
