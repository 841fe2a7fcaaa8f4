"""The activation store on real HDF5 files, no model: layout, round trip, commit, resume, refusals, join."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from mechbiqa.store import (
    STATUS_FAILED,
    STATUS_OK,
    ActivationStore,
    ArraySpec,
    BatchRows,
    CacheSpec,
    SampleInfo,
    SchemaVersionError,
    Site,
    StoreError,
    StoreLayout,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    join_stores,
    partial_path,
)

N, MAX_POS, N_LAYERS, D, HEADS, N_IMAGE = 10, 12, 3, 8, 2, 4


def make_layout(n: int = N) -> StoreLayout:
    arrays = (
        ArraySpec(
            "llm.blocks.{l}.hook_resid_post@quality",
            "llm.blocks.{l}.hook_resid_post",
            "quality",
            tuple(range(N_LAYERS)),
            (1, D),
            ("pos", "d_model"),
        ),
        ArraySpec(
            "llm.blocks.{l}.hook_resid_post@image",
            "llm.blocks.{l}.hook_resid_post",
            "image",
            (0, 2),
            (N_IMAGE, D),
            ("pos", "d_model"),
        ),
        ArraySpec(
            "llm.blocks.{l}.attn.hook_pattern@quality",
            "llm.blocks.{l}.attn.hook_pattern",
            "quality",
            tuple(range(N_LAYERS)),
            (HEADS, 1, MAX_POS),
            ("head", "pos", "key_pos"),
        ),
        ArraySpec(
            "llm.unembed.hook_out@quality", "llm.unembed.hook_out", "quality", (), (1, 5), ("pos", "vocab")
        ),
    )
    return StoreLayout(
        n, MAX_POS, (("image", N_IMAGE), ("quality", 1)), arrays, answer_bytes=16, dtype="float32"
    )


ATTRS = {
    "model_config": json.dumps({"d": D}),
    "model_identity": json.dumps({"fingerprint": "abc"}),
    "tokenizer": "{}",
    "prompt": "{}",
    "run": json.dumps({"batch_size": 4}),
    "cache_spec": json.dumps(CacheSpec.default("float32").to_dict()),
}


def samples(n: int = N, prefix: str = "s") -> list[SampleInfo]:
    return [
        SampleInfo(f"{prefix}{i}", f"/img/{prefix}{i}.png", "prompt", label=i / n, record={"i": i})
        for i in range(n)
    ]


def batch(
    layout: StoreLayout, start: int, stop: int, seed: int = 0, failed: tuple[int, ...] = ()
) -> BatchRows:
    """Rows whose values encode (sample, layer) so reads can be checked exactly."""
    n = stop - start
    acts = {}
    for spec in layout.arrays:
        shape = (spec.n_layer_slots, n, *spec.shape)
        base = (
            np.arange(start, stop, dtype=np.float32)[None, :] * 100 + np.arange(spec.n_layer_slots)[:, None]
        )
        acts[spec.key] = (
            base.reshape(spec.n_layer_slots, n, *[1] * len(spec.shape))
            + np.random.default_rng(seed + start).random(shape, dtype=np.float32) * 0.01
        )
    rows = {}
    for name, (dtype, row) in layout.row_datasets().items():
        if name != "samples/status":
            rows[name] = np.zeros((n, *row), dtype=dtype)
    rows["samples/n_positions"][:] = MAX_POS - 1
    rows["tokens/role"][:, :] = 1
    rows["select/quality/positions"][:, 0] = MAX_POS - 2
    rows["select/quality/count"][:] = 1
    rows["samples/answer"][:] = b"an answer"
    status = np.full(n, STATUS_OK, dtype=np.int8)
    for i in failed:
        status[i - start] = STATUS_FAILED
        rows["samples/error"][i - start] = b"corrupt image"
        for key in acts:
            acts[key][:, i - start] = 0
    return BatchRows(start, status, rows, acts)


def write_store(
    path, layout=None, upto: int = N, finish: bool = True, failed=(), ids_prefix="s", attrs=ATTRS
):
    layout = layout or make_layout()
    writer = StoreWriter.open(path, layout, attrs, samples(layout.n_samples, ids_prefix))
    for start in range(0, upto, 4):
        stop = min(upto, start + 4)
        writer.write(batch(layout, start, stop, failed=tuple(i for i in failed if start <= i < stop)))
    if finish:
        writer.finish()
    else:
        writer.close()
    return layout


# ----------------------------------------------------------------------------- spec
def test_site_normalises_concrete_layers_and_rejects_bad_selections():
    site = Site("llm.blocks.3.hook_resid_post", "image")
    assert (site.hook, site.layers, site.key) == (
        "llm.blocks.{l}.hook_resid_post",
        (3,),
        "llm.blocks.{l}.hook_resid_post@image",
    )
    with pytest.raises(ValueError, match="select"):
        Site("llm.blocks.{l}.hook_resid_post", "nowhere")
    with pytest.raises(ValueError, match="no layer"):
        Site("llm.unembed.hook_out", "quality", layers=(1,))
    with pytest.raises(ValueError, match="image-side"):
        Site("abstractor.hook_out", "quality")


def test_cache_spec_parse_round_trip_and_duplicates():
    spec = CacheSpec.parse("default; llm.blocks.{l}.hook_attn_out@quality:0,2-3", dtype="float32")
    assert [s.key for s in spec.sites][:4] == [s.key for s in CacheSpec.default().sites]
    assert spec.sites[-1].layers == (0, 2, 3) and spec.dtype == "float32"
    assert CacheSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert CacheSpec.parse(str(spec), dtype="float32") == spec
    with pytest.raises(ValueError, match="more than once"):
        CacheSpec((Site("llm.unembed.hook_out"), Site("llm.unembed.hook_out")))
    with pytest.raises(ValueError, match="cannot parse"):
        CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality:x")
    with pytest.raises(KeyError, match="known"):
        CacheSpec.preset("nope")


# ----------------------------------------------------------------------------- round trip
def test_round_trip_shapes_values_and_metadata(tmp_path):
    path = tmp_path / "s.h5"
    layout = write_store(path, failed=(5,))
    assert path.exists() and not partial_path(path).exists()
    with ActivationStore.open(path) as store:
        assert store.complete and store.n_samples == N
        assert list(store.valid) == [i for i in range(N) if i != 5]
        resid = store.get("llm.blocks.{l}.hook_resid_post")  # [sample, layer, pos, d]
        assert resid.shape == (N - 1, N_LAYERS, 1, D)
        assert store.dims("llm.blocks.{l}.hook_resid_post") == ("sample", "layer", "pos", "d_model")
        np.testing.assert_allclose(
            resid[:, :, 0, 0].round(), store.valid[:, None] * 100 + np.arange(N_LAYERS)
        )
        one = store.get("llm.blocks.2.hook_resid_post", samples="all")  # concrete name = that layer
        assert one.shape == (N, 1, D) and np.allclose(
            one[:, 0, 0].round(), (np.arange(N) * 100 + 2) * (np.arange(N) != 5)
        )
        assert store.get(lambda layer: f"llm.blocks.{layer}.hook_resid_post", layers=[0, 2]).shape == (
            N - 1,
            2,
            1,
            D,
        )
        image = store.get("llm.blocks.{l}.hook_resid_post", "image", layers=2, samples=[1, 7])
        assert image.shape == (2, N_IMAGE, D) and np.allclose(image[:, 0, 0].round(), [101, 701])
        assert store.get("llm.blocks.{l}.attn.hook_pattern", samples=3).shape == (N_LAYERS, HEADS, 1, MAX_POS)
        assert store.get("llm.unembed.hook_out").shape == (N - 1, 1, 5)
        with pytest.raises(KeyError, match="stored layers"):
            store.get("llm.blocks.1.hook_resid_post", "image")
        with pytest.raises(KeyError, match="stored"):
            store.get("llm.blocks.{l}.hook_mlp_out")
        assert store.ids()[:2] == ["s0", "s1"] and store.image_paths("all")[5] == "/img/s5.png"
        assert store.records(samples=[0])[0] == {"i": 0} and store.answers()[0] == "an answer"
        assert np.isclose(store.labels(samples=2), 0.2)
        [error] = store.errors()
        assert (error.index, error.id, error.reason) == (5, "s5", "corrupt image")
        assert store.positions("quality").shape == (N - 1, 1) and set(store.counts("quality")) == {1}
        assert store.roles().shape == (N - 1, MAX_POS) and len(store.token_roles(0)) == MAX_POS - 1
        assert store.info.layout == layout and store.info.spec is not None and store.info.git_sha is not None
        assert store.index_of("s4") == 4
        layers = dict(store.iter_layers("llm.blocks.{l}.hook_resid_post", "image"))
        assert sorted(layers) == [0, 2]


def test_write_rejects_wrong_shapes(tmp_path):
    layout = make_layout()
    with StoreWriter.open(tmp_path / "s.h5", layout, ATTRS, samples()) as writer:
        rows = batch(layout, 0, 4)
        rows.acts["llm.unembed.hook_out@quality"] = np.zeros((1, 4, 1, 6), np.float32)
        with pytest.raises(ValueError, match="expected shape"):
            writer.write(rows)
        rows = batch(layout, 0, 4)
        rows.status[0] = 0
        with pytest.raises(ValueError, match="recorded"):
            writer.write(rows)


# ----------------------------------------------------------------------------- commit and resume
def test_partial_store_shows_committed_samples_and_resumes(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, upto=8, finish=False)
    assert not path.exists() and partial_path(path).exists()
    with ActivationStore.open(path) as store:
        assert not store.complete and list(store.valid) == list(range(8))
        assert store.get("llm.blocks.{l}.hook_resid_post").shape[0] == 8
    layout = make_layout()
    writer = StoreWriter.open(path, layout, ATTRS, samples())
    assert writer.first_pending == 8 and not writer.complete
    writer.write(batch(layout, 8, 10))
    writer.finish()
    assert path.exists() and not partial_path(path).exists()
    clean = tmp_path / "clean.h5"
    write_store(clean)
    with ActivationStore.open(path) as a, ActivationStore.open(clean) as b:
        assert a.digest() == b.digest()


def test_half_written_batch_is_ignored_and_rewritten(tmp_path):
    """A kill mid-batch leaves data rows written, status not; the rewrite equals a clean run."""
    path, layout = tmp_path / "s.h5", make_layout()
    write_store(path, upto=4, finish=False)
    with StoreWriter.open(path, layout, ATTRS, samples()) as writer:
        garbage = batch(layout, 4, 8, seed=99)
        for key in garbage.acts:
            garbage.acts[key] += 1e6
        writer._fsync = False
        status_offset = writer._offsets["samples/status"]
        writer._offsets["samples/status"] = writer._offsets[
            "samples/n_positions"
        ]  # the commit goes nowhere...
        writer.write(garbage)
        writer._offsets["samples/status"] = status_offset
    with h5py.File(
        partial_path(path), "r+"
    ) as f:  # ...and the row it hit is restored as a kill would leave it
        f["samples/n_positions"][4:8] = 0
    with ActivationStore.open(path) as store:
        assert list(store.valid) == [0, 1, 2, 3]
    write_store(path)  # resumes at 4 and finishes
    clean = tmp_path / "clean.h5"
    write_store(clean)
    with ActivationStore.open(path) as a, ActivationStore.open(clean) as b:
        assert a.digest() == b.digest()


def test_creation_killed_before_rename_starts_over(tmp_path):
    path = tmp_path / "s.h5"
    tmp = partial_path(path).with_name(partial_path(path).name + ".tmp")
    tmp.write_bytes(b"half an HDF5 file")
    write_store(path)
    assert not tmp.exists() and path.exists()


def test_finished_store_is_not_rewritten_and_finish_needs_all_samples(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path)
    with StoreWriter.open(path, make_layout(), ATTRS, samples()) as writer:
        assert writer.complete and writer.first_pending == N
    write_store(tmp_path / "p.h5", upto=4, finish=False)
    with StoreWriter.open(tmp_path / "p.h5", make_layout(), ATTRS, samples()) as writer:
        with pytest.raises(StoreError, match="not recorded yet"):
            writer.finish()


# ----------------------------------------------------------------------------- refusals
def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter.open(path, make_layout(), ATTRS, samples()):
        with pytest.raises(StoreLockedError, match="another process"):
            StoreWriter.open(path, make_layout(), ATTRS, samples())
    StoreWriter.open(path, make_layout(), ATTRS, samples()).close()  # free again once closed


def test_store_from_another_model_or_sample_list_is_refused_on_append(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, upto=4, finish=False)
    other = {**ATTRS, "model_identity": json.dumps({"fingerprint": "xyz"})}
    with pytest.raises(StoreMismatchError, match="model_identity.*abc.*xyz"):
        StoreWriter.open(path, make_layout(), other, samples())
    with pytest.raises(StoreMismatchError, match="sample list differs"):
        StoreWriter.open(path, make_layout(), ATTRS, samples(prefix="t"))
    longer = StoreLayout(N, MAX_POS + 1, make_layout().capacities, make_layout().arrays, 16, "float32")
    with pytest.raises(StoreMismatchError, match="layout"):
        StoreWriter.open(path, longer, ATTRS, samples())
    StoreWriter.open(
        path, make_layout(), ATTRS, samples(), overwrite=False
    ).close()  # the right setup still resumes


def test_other_schema_version_is_named_on_read(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaVersionError, match="schema version 99.*reads version 2"):
        ActivationStore.open(path)
    with pytest.raises(SchemaVersionError):
        StoreWriter.open(path, make_layout(), ATTRS, samples())


def test_store_of_the_older_layout_is_refused_by_name(tmp_path):
    # schema 1 stores (one shared prompt, no samples/n_images) are neither read nor resumed
    path = tmp_path / "old.h5"
    write_store(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
        del f["samples/n_images"]
    with pytest.raises(
        SchemaVersionError, match=r"old\.h5 has store schema version 1.*older layout.*record it again"
    ):
        ActivationStore.open(path)
    with pytest.raises(SchemaVersionError, match="old.h5"):
        StoreWriter.open(path, make_layout(), ATTRS, samples())
    with pytest.raises(SchemaVersionError, match="old.h5"):
        join_stores([path], tmp_path / "joined.h5")


def test_n_images_round_trips(tmp_path):
    layout = make_layout(4)
    writer = StoreWriter.open(tmp_path / "s.h5", layout, ATTRS, samples(4))
    rows = batch(layout, 0, 4)
    rows.rows["samples/n_images"][:] = [1, 0, 1, 0]  # text-only samples beside image ones
    writer.write(rows)
    writer.finish()
    with ActivationStore.open(tmp_path / "s.h5") as store:
        assert store.n_images().tolist() == [1, 0, 1, 0] and store.n_images([1, 2]).tolist() == [0, 1]


def test_check_identity_names_the_model(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path)
    with ActivationStore.open(path) as store:
        store.check_identity({"fingerprint": "abc"})
        with pytest.raises(StoreMismatchError, match="fingerprint"):
            store.check_identity({"fingerprint": "zzz"})


def test_missing_store_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cache_activations.py"):
        ActivationStore.open(tmp_path / "none.h5")


# ----------------------------------------------------------------------------- join
def test_join_concatenates_shards_as_virtual_datasets(tmp_path):
    shards = []
    for k, n in enumerate((6, 4)):
        path = tmp_path / "shards" / f"{k}.h5"
        write_store(path, layout=make_layout(n), upto=n, ids_prefix=f"r{k}-")
        shards.append(path)
    assert join_stores(shards, tmp_path / "joined.h5") == tmp_path / "joined.h5"
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)  # relative source paths: the folder moves as a whole
    with ActivationStore.open(moved / "joined.h5") as store, ActivationStore.open(shards[1]) as second:
        assert store.n_samples == 10 and store.ids()[6] == "r1-0"
        resid = store.get("llm.blocks.{l}.hook_resid_post", "image")
        np.testing.assert_array_equal(resid[6:], second.get("llm.blocks.{l}.hook_resid_post", "image"))
        assert [s["stop"] for s in store.info.shards] == [6, 10]
    with pytest.raises(StoreError, match="does not exist"):
        join_stores([tmp_path / "nope.h5"], tmp_path / "j2.h5")


def test_join_refuses_shards_planned_with_other_layouts_and_ignores_their_rows(tmp_path):
    from mechbiqa.store import shard_difference

    base = make_layout(4)
    wide = base.union(StoreLayout(4, MAX_POS + 3, base.capacities, base.arrays, 16, "float32"))
    write_store(tmp_path / "a.h5", layout=make_layout(6), upto=6, ids_prefix="a")
    write_store(tmp_path / "b.h5", layout=make_layout(4), upto=4, ids_prefix="b")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        shard_a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.attrs.items()}
        shard_b = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in b.attrs.items()}
    assert shard_difference(shard_a, shard_b) is None  # their sample counts differ: that is per shard
    other_run = {**shard_b, "run": json.dumps({"batch_size": 4, "shard": {"rank": 1}})}
    assert shard_difference(shard_a, other_run) is None  # so is the shard's own range
    assert "batch_size" in shard_difference(shard_a, {**shard_b, "run": json.dumps({"batch_size": 2})})
    write_store(tmp_path / "c.h5", layout=wide, upto=4, ids_prefix="c")
    with pytest.raises(StoreError, match=r"cannot join .*a\.h5 and .*c\.h5: layout differs.*max_pos"):
        join_stores([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "j.h5")
    assert not (tmp_path / "j.h5").exists()


# ----------------------------------------------------------------------------- layouts of per-sample prompts
def test_layout_union_takes_the_largest_room_and_refuses_other_arrays():
    base = make_layout(5)
    longer = StoreLayout(3, MAX_POS + 4, (("image", N_IMAGE), ("quality", 2)), base.arrays, 40, "float32")
    joined = base.union(longer)
    assert (joined.n_samples, joined.max_pos, joined.capacity, joined.answer_bytes) == (
        5,
        MAX_POS + 4,
        {"image": N_IMAGE, "quality": 2},
        40,
    )
    pattern = joined.array("llm.blocks.{l}.attn.hook_pattern@quality")
    assert pattern.shape == (HEADS, 2, MAX_POS + 4)  # pos axis = capacity, key axis = max_pos
    assert joined.array("llm.blocks.{l}.hook_resid_post@image").shape == (N_IMAGE, D)
    assert joined.covers(base) and joined.covers(longer.with_samples(5)) and not base.covers(joined)
    assert base.union(base) == base
    fewer = StoreLayout(5, MAX_POS, base.capacities, base.arrays[:2], 16, "float32")
    with pytest.raises(StoreMismatchError, match="array llm.blocks.{l}.attn.hook_pattern@quality"):
        base.union(fewer)
    with pytest.raises(StoreMismatchError, match="dtype"):
        base.union(StoreLayout(5, MAX_POS, base.capacities, base.arrays, 16, "float16"))


def test_resume_keeps_a_wider_stored_layout_and_refuses_one_too_narrow(tmp_path):
    path = tmp_path / "s.h5"
    base = make_layout()
    wide = base.union(StoreLayout(N, MAX_POS + 2, base.capacities, base.arrays, 16, "float32"))
    write_store(path, layout=wide, upto=4, finish=False)
    with StoreWriter.open(path, make_layout(), ATTRS, samples()) as writer:  # this run needs less room
        assert writer.layout == wide and writer.first_pending == 4
    narrow = tmp_path / "n.h5"
    write_store(narrow, upto=4, finish=False)
    with pytest.raises(StoreMismatchError, match="layout"):
        StoreWriter.open(narrow, wide, ATTRS, samples())


# ----------------------------------------------------------------------------- retrying failed rows
def test_failed_rows_reopen_and_are_rewritten_alone(tmp_path):
    """A finished store with failed rows goes back to .partial; only those rows are written again."""
    path, layout = tmp_path / "s.h5", make_layout()
    write_store(path, failed=(2, 5))
    with ActivationStore.open(path) as store:
        before = {k: store.get(*k.split("@"), samples="all") for k in store.keys}
    writer = StoreWriter.open(path, layout, ATTRS, samples())
    assert writer.complete and list(writer.failed) == [2, 5]
    writer.reopen([5], samples())
    assert not path.exists() and partial_path(path).exists()  # the final name never holds pending rows
    assert list(writer.pending) == [5] and list(writer.failed) == [2]
    with ActivationStore.open(path) as store:  # a reader sees the row as pending meanwhile
        assert store.status[5] == 0 and not store.complete
    fixed = batch(layout, 4, 8, seed=7)
    rows = {k: v[1:2] for k, v in fixed.rows.items()}
    writer.write(BatchRows(5, fixed.status[1:2], rows, {k: v[:, 1:2] for k, v in fixed.acts.items()}))
    writer.finish()
    with ActivationStore.open(path) as store:
        assert store.complete and list(store.valid) == [i for i in range(N) if i != 2]
        assert [e.index for e in store.errors()] == [2]
        for key, old in before.items():
            new = store.get(*key.split("@"), samples="all")
            np.testing.assert_array_equal(np.delete(new, 5, axis=0), np.delete(old, 5, axis=0))
            expected = fixed.acts[key][:, 1] if store.layout.array(key).layers else fixed.acts[key][0, 1]
            np.testing.assert_array_equal(new[5], expected.astype(np.float32))
    with pytest.raises(ValueError, match="not failed"):
        StoreWriter.open(path, layout, ATTRS, samples()).reopen([0], samples())


def test_reopened_rows_with_new_sample_texts_are_written_in_a_copy(tmp_path):
    path, layout = tmp_path / "s.h5", make_layout()
    write_store(path, failed=(3,))
    infos = samples()
    infos[3] = SampleInfo("s3", "/img/s3.png", "a new prompt", label=0.75, record={"rating": "good"})
    with StoreWriter.open(path, layout, ATTRS, infos) as writer:
        writer.reopen([3], infos)
        assert list(writer.pending) == [3]
    with ActivationStore.open(path) as store:
        assert not store.complete and store.prompts(samples=[3]) == ["a new prompt"]
        assert store.records(samples=[3]) == [{"rating": "good"}] and np.isclose(
            store.labels(samples=3), 0.75
        )
        assert store.prompts(samples=[2]) == ["prompt"] and store.records(samples=[4]) == [{"i": 4}]
    write_store(path)  # resumes the reopened row (and finishes)
    with ActivationStore.open(path) as store:
        assert store.complete and len(store.valid) == N


def test_a_reopen_killed_between_its_renames_keeps_the_finished_store(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, failed=(1,))
    shutil.copyfile(path, partial_path(path))  # what a kill after the copy's rename leaves beside it
    with StoreWriter.open(path, make_layout(), ATTRS, samples()) as writer:
        assert writer.complete and list(writer.failed) == [1]
    assert path.exists() and not partial_path(path).exists()


def test_check_resumable_refuses_before_any_work(tmp_path):
    from mechbiqa.store import check_resumable

    path = tmp_path / "s.h5"
    check_resumable(path, ATTRS)  # nothing there: nothing to refuse
    write_store(path, upto=4, finish=False)
    check_resumable(path, ATTRS, make_layout(), ids=[s.id for s in samples()])
    with pytest.raises(StoreMismatchError, match="cache_spec differs"):
        other = json.dumps(CacheSpec.preset("quality", "float32").to_dict())
        check_resumable(path, {**ATTRS, "cache_spec": other})
    with pytest.raises(StoreMismatchError, match="sample list differs"):
        check_resumable(path, ATTRS, ids=["x"])


def test_missing_keys_are_key_errors_printed_as_one_plain_line(tmp_path):
    from mechbiqa.store import StoreKeyError

    path = tmp_path / "s.h5"
    write_store(path)
    with ActivationStore.open(path) as store:
        with pytest.raises(StoreKeyError) as info:
            store.get("llm.blocks.{l}.hook_mlp_out")
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    assert str(info.value).startswith("no array 'llm.blocks.{l}.hook_mlp_out@quality' in this store")
    with pytest.raises(KeyError) as info:
        CacheSpec.preset("nope")
    assert str(info.value).startswith("unknown cache spec preset 'nope'") and "\n" not in str(info.value)


def test_shard_ranges_cover_the_samples_in_whole_batches():
    from mechbiqa.store.shards import shard_range

    for n, world, align in [(13, 2, 3), (100, 3, 8), (7, 4, 2), (5, 2, 8), (9, 3, 1)]:
        ranges = [shard_range(n, r, world, align) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, no overlap
        if -(-n // align) >= world:  # enough batches: every rank but the last starts and stops at a batch
            assert all(lo % align == 0 and lo < hi for lo, hi in ranges)
    assert [shard_range(13, r, 2, 3) for r in range(2)] == [(0, 6), (6, 13)]
    assert [shard_range(5, r, 2, 8) for r in range(2)] == [(0, 2), (2, 5)]  # one batch: split as before
