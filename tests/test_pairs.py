"""ldr_tf.data.pairs: pairing rules, the pure-function-of-index stream, the tf.data pipeline and its error paths."""

from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.data import pairs as P
from ldr_tf.data.augment import FFDParams
from ldr_tf.data.dataset import DatasetError, Descriptor, H5Writer, load_descriptor, write_descriptor

N = 16
KEYS = ["s0", "s1", "s2", "s3", "s4"]


def _write_dataset(root, keys=KEYS, shape=(N, N, N), atlas=None, no_seg=("s4",), subsets=None, schemes=None):
    rng = np.random.default_rng(7)
    truth = {}
    with H5Writer(root / "data.h5") as w:
        for i, k in enumerate(keys):
            vol = rng.integers(0, 256, shape).astype(np.uint8)
            seg = None if k in no_seg else rng.integers(0, 4, shape)
            pts = rng.uniform(1, min(shape) - 2, (4 + i % 4, 3)).astype(np.float32)  # 4..7 landmarks
            w.add(k, vol, segmentation=seg, points=pts)
            truth[k] = (vol, seg, pts)
    desc = Descriptor(
        path=root / "data.json", files={"/": root / "data.h5"}, image_size=shape, image_type="liver",
        subsets=subsets or {"train": keys[:4], "val": keys[3:]},
        schemes=schemes or {"1": {"train": 1.0}, "2": {"val": 1.0}}, atlas=atlas,
    )
    write_descriptor(desc)
    return root / "data.json", truth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("pairs"))


def _collect(ds):
    out = {}
    for b in ds:
        for k, v in b.items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ pairing


def test_all_pairs_paired_and_atlas_lists(tmp_path, dataset):
    desc = load_descriptor(dataset[0])
    assert P.pairs_for(desc, "val") == [("s3", "s4"), ("s4", "s3")]
    assert P.pairs_for(desc, "train")[:4] == [("s0", "s1"), ("s0", "s2"), ("s0", "s3"), ("s1", "s0")]
    assert P.pairs_for(desc, "1") == [(a, b) for a in KEYS[:4] for b in KEYS[:4] if a != b]
    assert P.pairs_for(desc, "1") == P.pairs_for(desc, "train")
    assert P.pairs_for(desc, "train", paired=True) == [("s0", "s1"), ("s1", "s0"), ("s2", "s3"), ("s3", "s2")]
    odd = Descriptor(**{**desc.__dict__, "subsets": {"odd": ["s0", "s1", "s2"]}, "schemes": {}})
    with pytest.raises(DatasetError, match="even number of keys in 'odd'"):
        P.pairs_for(odd, "odd", paired=True)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        P.pairs_for(desc, "test")
    atlas = Descriptor(**{**desc.__dict__, "atlas": "s0", "subsets": {"train": ["s0", "s1", "s2"], "val": ["s3"]}})
    assert P.pairs_for(atlas, "train") == [("s0", "s1"), ("s0", "s2")]  # the atlas is excluded as moving
    assert P.pairs_for(atlas, "2") == [("s0", "s3")]
    with pytest.raises(ValueError, match="paired"):
        P.pairs_for(atlas, "train", paired=True)


def test_schemes_concatenate_subsets_and_compose_batches_by_fraction(dataset):
    desc = load_descriptor(dataset[0])
    mixed = Descriptor(**{**desc.__dict__, "subsets": {"a": ["s0", "s1", "s2"], "b": ["s3", "s4"]},
                          "schemes": {"mix": {"a": 3, "b": 1}}})
    assert P.scheme_fractions(mixed, "mix") == [("a", 0.75), ("b", 0.25)]
    assert P.pairs_for(mixed, "mix") == P.subset_pairs(mixed, "a") + P.subset_pairs(mixed, "b")
    stream = P.PairStream(mixed, "mix", seed=3, composition_batch=4)
    a_pairs, b_pairs = set(P.subset_pairs(mixed, "a")), set(P.subset_pairs(mixed, "b"))
    for batch in range(10):
        got = [stream.pair(4 * batch + r) for r in range(4)]
        assert all(p in a_pairs for p in got[:3]) and got[3] in b_pairs
    assert P.batch_composition([0.5, 0.3, 0.2], 4) == [2, 1, 1]
    assert P.batch_composition([1 / 3] * 3, 4) == [2, 1, 1]
    for b in range(1, 9):
        assert sum(P.batch_composition([0.45, 0.35, 0.2], b)) == b


def test_stream_is_a_seeded_permutation_per_epoch(dataset):
    desc = load_descriptor(dataset[0])
    all_pairs = P.pairs_for(desc, "train")
    s = P.PairStream(desc, "train", seed=5)
    epochs = [[s.pair(e * 12 + i) for i in range(12)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == sorted(all_pairs)
    assert epochs[0] != epochs[1] and epochs[0] != all_pairs
    assert [P.PairStream(desc, "train", seed=5).pair(i) for i in range(36)] == sum(epochs, [])
    assert [P.PairStream(desc, "train", seed=6).pair(i) for i in range(12)] != epochs[0]
    ordered = P.PairStream(desc, "train", shuffle=False)
    assert [ordered.pair(i) for i in range(24)] == all_pairs * 2


def test_keep_restricts_the_stream_to_the_pairs_it_keeps(dataset):
    desc = load_descriptor(dataset[0])
    all_pairs = P.pairs_for(desc, "train")
    kept = set(all_pairs[::4])
    s = P.PairStream(desc, "train", seed=5, keep=lambda f, m: (f, m) in kept)
    assert s.num_pairs == len(kept) < len(all_pairs)
    epoch = [s.pair(i) for i in range(len(kept))]
    assert sorted(epoch) == sorted(kept) and s.keys() == sorted({k for p in kept for k in p})
    finite = P.PairStream(desc, "train", shuffle=False, repeat=False, keep=lambda f, m: (f, m) in kept)
    assert [finite.pair(i) for i in range(finite.num_pairs)] == [p for p in all_pairs if p in kept]
    with pytest.raises(DatasetError, match="yields no pair that is kept"):
        P.PairStream(desc, "train", keep=lambda f, m: False)


# ------------------------------------------------------------------------------------------ pipeline


def test_eval_round_trip_values_shapes_and_order(dataset):
    path, truth = dataset
    ds = P.make_pair_dataset(path, "train", batch_size=5, augment=False, shuffle=False, repeat=False)
    got = _collect(ds)
    expected = P.pairs_for(load_descriptor(path), "train")
    assert list(zip(got["id1"].astype(str), got["id2"].astype(str))) == expected  # every pair once, in order
    n = len(expected)
    assert got["fixed"].shape == (n, N, N, N, 1) and got["fixed"].dtype == np.float32
    assert got["moving_seg"].shape == (n, N, N, N) and got["moving_seg"].dtype == np.int32
    assert got["fixed_points"].shape == (n, 6, 3) and got["aug_flow"].shape == (n, N, N, N, 3)
    assert got["has_seg"].dtype == bool and not np.any(got["aug_flow"])
    assert 0.0 <= got["moving"].min() and got["moving"].max() <= 1.0
    for k, (f, m) in enumerate(expected):
        np.testing.assert_array_equal(got["fixed"][k, ..., 0], truth[f][0] / np.float32(255.0))
        np.testing.assert_array_equal(got["moving_seg"][k], truth[m][1])
        pts = truth[m][2][:6]
        np.testing.assert_array_equal(got["moving_points"][k, : len(pts)], pts)
        assert np.all(got["moving_points"][k, len(pts):] == -1)  # padded
    # the subject without segmentation gives zeros and has_seg False
    val = _collect(P.make_pair_dataset(path, "val", 2, augment=False, shuffle=False, repeat=False))
    assert not val["has_seg"].any() and not np.any(val["moving_seg"][0])


def test_resume_equals_the_tail_of_an_uninterrupted_run(dataset):
    path, _ = dataset
    aug = FFDParams(label_method="nearest")
    full = list(P.make_pair_dataset(path, "train", 2, seed=11, augment=aug).take(8))
    tail = list(P.make_pair_dataset(path, "train", 2, seed=11, augment=aug, start_step=5).take(3))
    for a, b in zip(full[5:], tail):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    assert np.any(full[5]["aug_flow"].numpy())
    # the epoch boundary (12 pairs = 6 batches) is crossed and each epoch holds every pair once
    ids = [(x, y) for b in full[:6] for x, y in zip(b["id1"].numpy(), b["id2"].numpy())]
    assert len(set(ids)) == 12


def test_two_shards_are_disjoint_and_cover_the_stream(dataset):
    path, _ = dataset
    whole = list(P.make_pair_dataset(path, "train", 4, seed=2, augment=False).take(4))
    shards = []
    for w in (0, 1):
        ctx = SimpleNamespace(num_input_pipelines=2, input_pipeline_id=w, num_replicas_in_sync=2)
        shards.append(list(P.make_pair_dataset(path, "train", 2, seed=2, augment=False, input_context=ctx,
                                               start_step=1).take(3)))
    for k in range(3):
        a, b = shards[0][k]["index"].numpy(), shards[1][k]["index"].numpy()
        assert not set(a) & set(b)
        assert sorted(np.concatenate([a, b])) == list(whole[k + 1]["index"].numpy())
        merged = {}
        for s in (0, 1):
            sb = shards[s][k]
            merged.update(zip(sb["index"].numpy(), zip(sb["id1"].numpy(), sb["id2"].numpy())))
        assert [merged[i] for i in whole[k + 1]["index"].numpy()] == list(
            zip(whole[k + 1]["id1"].numpy(), whole[k + 1]["id2"].numpy()))
    # one pipeline feeding 2 replicas: a training step takes 2 consecutive per-replica batches = one global batch
    ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    steps = list(P.make_pair_dataset(path, "train", 2, seed=2, augment=False, input_context=ctx,
                                     start_step=1).take(4))
    for k in range(2):
        got = np.concatenate([steps[2 * k]["index"].numpy(), steps[2 * k + 1]["index"].numpy()])
        np.testing.assert_array_equal(got, whole[k + 1]["index"].numpy())
    # finite mode: the shards hold every pair exactly once
    seen = []
    for w in (0, 1):
        ctx = SimpleNamespace(num_input_pipelines=2, input_pipeline_id=w, num_replicas_in_sync=2)
        ds = P.make_pair_dataset(path, "train", 5, augment=False, shuffle=False, repeat=False, input_context=ctx)
        got = _collect(ds)
        seen += list(zip(got["id1"].astype(str), got["id2"].astype(str)))
    assert sorted(seen) == sorted(P.pairs_for(load_descriptor(path), "train"))


def test_image_size_resamples_volumes_labels_and_points(dataset):
    path, truth = dataset
    got = next(iter(P.make_pair_dataset(path, "train", 1, augment=False, shuffle=False, image_size=(8, 8, 8))))
    assert got["fixed"].shape == (1, 8, 8, 8, 1) and got["fixed_seg"].shape == (1, 8, 8, 8)
    assert set(np.unique(got["fixed_seg"])) <= {0, 1, 2, 3}
    pts = truth["s0"][2][:6]
    np.testing.assert_allclose(got["fixed_points"].numpy()[0, : len(pts)], (pts + 0.5) / 2 - 0.5, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_hdf5_named_by_the_descriptor(tmp_path):
    path, _ = _write_dataset(tmp_path)
    (tmp_path / "data.h5").unlink()
    with pytest.raises(DatasetError, match="data.h5"):
        P.make_pair_dataset(path, "train", 2)


def test_truncated_and_garbage_hdf5(tmp_path):
    path, _ = _write_dataset(tmp_path)
    h5 = tmp_path / "data.h5"
    h5.write_bytes(h5.read_bytes()[:2000])
    with pytest.raises(DatasetError, match=r"data\.h5: not a readable HDF5"):
        P.make_pair_dataset(path, "train", 2)
    h5.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(DatasetError, match=r"data\.h5: not a readable HDF5"):
        P.make_pair_dataset(path, "train", 2)


def test_subject_without_volume_missing_key_nan_and_size_mismatch(tmp_path):
    path, _ = _write_dataset(tmp_path)
    with h5py.File(tmp_path / "data.h5", "a") as f:
        del f["s1/volume"]
    with pytest.raises(DatasetError, match=r"data\.h5: subject 's1' has no 'volume'"):
        P.make_pair_dataset(path, "train", 2)

    path, _ = _write_dataset(tmp_path)
    raw = load_descriptor(path).to_json()
    raw["subsets"]["train"].append("nobody")
    write_descriptor(Descriptor(**{**load_descriptor(path).__dict__, "subsets": raw["subsets"]}))
    with pytest.raises(DatasetError, match=r"data\.h5: subject 'nobody' not found"):
        P.make_pair_dataset(path, "train", 2)

    path, _ = _write_dataset(tmp_path)
    with h5py.File(tmp_path / "data.h5", "a") as f:
        vol = np.asarray(f["s2/volume"], np.float32)
        vol[3, 4, 5] = np.nan
        del f["s2/volume"]
        f["s2/volume"] = vol
    with pytest.raises(DatasetError, match=r"data\.h5: subject 's2'.*NaN"):
        P.make_pair_dataset(path, "train", 2)

    path, _ = _write_dataset(tmp_path, shape=(N, N, N + 2))
    desc = load_descriptor(path)
    write_descriptor(Descriptor(**{**desc.__dict__, "image_size": (N, N, N)}))
    with pytest.raises(DatasetError, match=r"data\.h5: subject 's0': volume shape \(16, 16, 18\) != image_size"):
        P.make_pair_dataset(path, "train", 2)


def test_bad_arguments(dataset):
    path, _ = dataset
    with pytest.raises(ValueError, match="batch_size"):
        P.make_pair_dataset(path, "train", 0)
    with pytest.raises(ValueError, match="start_step"):
        P.make_pair_dataset(path, "train", 2, start_step=-1)
    with pytest.raises(ValueError, match="augment"):
        P.make_pair_dataset(path, "train", 2, augment="yes")
    with pytest.raises(ValueError, match="seed"):
        P.PairStream(path, "train", seed=-1)
