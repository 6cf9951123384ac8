"""Registration pairs from a dataset descriptor, and the ``tf.data`` pipeline that streams them.

Pairing (reference 7.3)
-----------------------
* **all pairs** (default): every ordered pair ``(keys[i], keys[j])``, ``i != j``, of a subset, in row-major order
  (``n (n - 1)`` pairs); fixed first.
* **paired** (``paired=True``): list neighbours ``(a, b)`` become ``(a, b)`` and ``(b, a)`` (e.g. LSPIG); the subset
  must have an even length.
* **atlas** (the descriptor has ``atlas``): fixed = the atlas, moving = each subject of the subset except the atlas,
  for training and evaluation alike. ``paired`` cannot be combined with an atlas.

A *split* names a scheme (``"1"``/``"train"`` = training, ``"2"``/``"val"`` = validation, or any other scheme of the
descriptor) or a subset. A scheme mixes subsets by fraction (fractions are normalised to sum 1; subsets with fraction
0 are dropped); a subset is a scheme of one subset with fraction 1. Scheme names win over subset names.

The stream (pure function of the element index)
------------------------------------------------
Elements are numbered ``i = 0, 1, 2, ...`` over the whole (unsharded) stream; element ``i`` is a pure function of
``(seed, i)`` (and of the composition batch size, see below):

* **repeat** (training): each subset has its own endless sub-stream. Global batch ``b`` (``G`` elements:
  ``batch_size``, or ``batch_size * num_replicas_in_sync`` under a strategy) holds ``n_s`` elements of subset ``s``,
  where ``n_s`` rounds ``fraction_s * G`` by the largest-remainder rule (floor everything, then give the leftover
  slots to the largest remainders, ties to the earlier subset in the scheme), so the counts always sum to ``G`` and
  each differs from ``fraction_s * G`` by less than one. Slots of a batch are filled subset by subset in scheme
  order. The ``m``-th element of subset ``s`` is pair ``perm_{s,e}[m % N_s]`` of epoch ``e = m // N_s`` where
  ``perm_{s,e}`` is a permutation drawn from ``numpy.random.default_rng([seed, s, e])`` (identity when
  ``shuffle=False``). With one subset this is simply: element ``i`` -> epoch ``i // n_pairs``, permuted per epoch.
* **no repeat** (evaluation): every pair of every subset of the split exactly once, subsets concatenated in scheme
  order (fractions ignored), permuted once with ``default_rng([seed, 2**31, 0])`` when ``shuffle=True``.

Hence ``start_step=k`` skips exactly ``k`` batches: it yields what an uninterrupted run yields from batch ``k`` on.

Sharding (``tf.distribute.InputContext``, as passed by ``strategy.distribute_datasets_from_function``): with
``W = num_input_pipelines``, ``w = input_pipeline_id`` and ``R = num_replicas_in_sync / W`` replicas per pipeline,
pipeline ``w`` takes the elements ``i = W * l + w`` (``l = 0, 1, ...``) in order and batches them by ``batch_size``
(the per-replica batch, ``ctx.get_per_replica_batch_size(global_batch)``). One training step consumes ``R``
consecutive batches of every pipeline, and together they are exactly global batch ``k`` (``G = batch_size *
num_replicas_in_sync`` elements, also the composition batch) of the unsharded stream: pipelines are disjoint and
together cover it. With an input context, ``start_step`` counts training steps (``start_step * R`` batches of the
pipeline are skipped); without one it counts batches. Auto-sharding is turned off on the returned dataset because
it is sharded already.

Augmentation of element ``i`` uses the stateless seed ``(seed, i)``, so it does not depend on the worker,
the thread or the order in which elements are read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tensorflow as tf

from ldr_tf.data import augment as aug_ops
from ldr_tf.ops import warp as warp_ops
from ldr_tf.data.dataset import DatasetError, Descriptor, load_descriptor, read_subject

__all__ = [
    "SPLIT_ALIASES",
    "scheme_fractions",
    "subset_pairs",
    "pairs_for",
    "batch_composition",
    "PairStream",
    "check_subjects",
    "make_pair_dataset",
]

SPLIT_ALIASES = {"train": "1", "training": "1", "val": "2", "valid": "2", "validation": "2"}
NUM_POINTS = 6
_EVAL_PERM_STREAM = 2**31


def _descriptor(desc) -> Descriptor:
    return desc if isinstance(desc, Descriptor) else load_descriptor(desc)


def scheme_fractions(desc: Descriptor, split: str) -> list[tuple[str, float]]:
    """``[(subset, fraction), ...]`` of a split (scheme name, alias or subset name); fractions sum to 1.

    Raises:
      DatasetError: unknown split, or fractions that are negative or all zero.
    """
    split = str(split)
    name = SPLIT_ALIASES.get(split, split)
    if name in desc.schemes:
        items = [(s, float(f)) for s, f in desc.schemes[name].items()]
    elif split in desc.subsets:
        items = [(split, 1.0)]
    else:
        raise DatasetError(
            f"{desc.path}: unknown split '{split}'; schemes: {sorted(desc.schemes)}, subsets: {sorted(desc.subsets)}"
        )
    if any(f < 0 for _, f in items):
        raise DatasetError(f"{desc.path}: scheme '{name}' has a negative fraction: {dict(items)}")
    total = sum(f for _, f in items)
    if total <= 0:
        raise DatasetError(f"{desc.path}: scheme '{name}' has no subset with a positive fraction")
    return [(s, f / total) for s, f in items if f > 0]


class _SubsetPairs:
    """The pairs of one subset, computed on demand (1025 subjects give ~1M ordered pairs: no list is built)."""

    def __init__(self, desc: Descriptor, subset: str, paired: bool):
        if subset not in desc.subsets:
            raise DatasetError(f"{desc.path}: unknown subset '{subset}'")
        keys = [str(k) for k in desc.subsets[subset]]
        self.atlas = desc.atlas
        if desc.atlas:
            if paired:
                raise ValueError(f"paired: cannot be combined with the atlas '{desc.atlas}' of {desc.path}")
            self.mode, self.keys = "atlas", [k for k in keys if k != desc.atlas]
            self.size = len(self.keys)
        elif paired:
            if len(keys) % 2:
                raise DatasetError(
                    f"{desc.path}: paired mode needs an even number of keys in '{subset}', got {len(keys)}"
                )
            self.mode, self.keys, self.size = "paired", keys, len(keys)
        else:
            self.mode, self.keys, self.size = "all", keys, len(keys) * (len(keys) - 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, p: int) -> tuple[str, str]:
        if self.mode == "atlas":
            return self.atlas, self.keys[p]
        if self.mode == "paired":
            k, side = divmod(p, 2)
            a, b = self.keys[2 * k], self.keys[2 * k + 1]
            return (a, b) if side == 0 else (b, a)
        i, r = divmod(p, len(self.keys) - 1)  # row i, r-th column skipping the diagonal
        return self.keys[i], self.keys[r + (r >= i)]

    def subjects(self) -> set:
        return set(self.keys) | ({self.atlas} if self.mode == "atlas" and self.keys else set())


class _KeptPairs:
    """The pairs of a `_SubsetPairs` that a predicate keeps, as a list (`PairStream`'s ``keep``)."""

    def __init__(self, pairs: _SubsetPairs, keep):
        self.kept = [pairs[p] for p in range(len(pairs)) if keep(*pairs[p])]

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, p: int) -> tuple[str, str]:
        return self.kept[p]

    def subjects(self) -> set:
        return {k for pair in self.kept for k in pair}


def subset_pairs(desc: Descriptor, subset: str, paired: bool = False) -> list[tuple[str, str]]:
    """Pairs ``(fixed_key, moving_key)`` of one subset (all ordered pairs, paired, or atlas; see module doc)."""
    pairs = _SubsetPairs(desc, subset, paired)
    return [pairs[p] for p in range(len(pairs))]


def pairs_for(desc, subset_or_scheme: str, paired: bool = False) -> list[tuple[str, str]]:
    """Every pair of a split once: the pairs of its subsets concatenated in scheme order.

    Args:
      desc: a `Descriptor` or a path to a descriptor JSON.
      subset_or_scheme: scheme name (``"1"``, ``"2"``, ``"train"``, ``"val"``, named schemes) or subset name.
      paired: neighbour pairing instead of all ordered pairs.

    Returns:
      list of ``(fixed_key, moving_key)``.
    """
    desc = _descriptor(desc)
    out = []
    for subset, _ in scheme_fractions(desc, subset_or_scheme):
        out += subset_pairs(desc, subset, paired)
    return out


def batch_composition(fractions, batch_size: int) -> list[int]:
    """Largest-remainder rounding of ``fraction * batch_size``: counts that sum to `batch_size`.

    Ties between equal remainders go to the earlier entry.
    """
    raw = [float(f) * batch_size for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: batch_size - sum(counts)]:
        counts[k] += 1
    return counts


@dataclass(frozen=True)
class _Subset:
    name: str
    pairs: _SubsetPairs | _KeptPairs
    count: int  # elements per composition batch
    offset: int  # first slot in the batch


class PairStream:
    """The pure mapping ``element index -> (fixed_key, moving_key)`` described in the module docstring.

    Args:
      desc: `Descriptor` or descriptor path.
      split: scheme name, alias or subset name.
      seed: non-negative integer.
      shuffle: permute pairs per epoch (repeat) or once (no repeat).
      repeat: endless stream mixing subsets by fraction; else every pair once.
      paired: neighbour pairing.
      composition_batch: the global batch size ``G`` used to mix subsets (repeat mode only).
      keep: optional predicate ``keep(fixed_key, moving_key) -> bool``: only the pairs it keeps are streamed (e.g.
        those of a partial teacher-flow cache); a subset left without a pair is an error.

    Attributes:
      length: number of elements (None when repeating).
      num_pairs: number of distinct pairs.
      subsets: the subsets used, with their per-batch counts.
    """

    def __init__(self, desc, split: str, seed: int = 0, shuffle: bool = True, repeat: bool = True,
                 paired: bool = False, composition_batch: int = 1, keep=None):
        desc = _descriptor(desc)
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed}")
        if int(composition_batch) != composition_batch or composition_batch < 1:
            raise ValueError(f"composition_batch: expected a positive integer, got {composition_batch}")
        self.seed, self.shuffle, self.repeat = int(seed), bool(shuffle), bool(repeat)
        self.composition_batch = int(composition_batch)
        fractions = scheme_fractions(desc, split)
        counts = batch_composition([f for _, f in fractions], self.composition_batch)
        subsets, offset = [], 0
        for (name, _), count in zip(fractions, counts):
            pairs = _SubsetPairs(desc, name, paired)
            if keep is not None:
                pairs = _KeptPairs(pairs, keep)
            if not len(pairs):
                raise DatasetError(f"{desc.path}: subset '{name}' of split '{split}' yields no pair"
                                   + (" that is kept (e.g. none is in the teacher cache)" if keep else ""))
            subsets.append(_Subset(name, pairs, count, offset))
            offset += count
        self.subsets = tuple(subsets)
        self._starts = np.cumsum([0] + [len(s.pairs) for s in subsets])  # finite mode: concatenated subsets
        self.num_pairs = int(self._starts[-1])
        self.length = None if self.repeat else self.num_pairs
        self._slot_owner = np.repeat(np.arange(len(subsets)), [s.count for s in subsets])
        self._perm = lru_cache(maxsize=8)(self._permutation)

    def _permutation(self, stream: int, epoch: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, stream, epoch]).permutation(n)

    def pair(self, i: int) -> tuple[str, str]:
        """``(fixed_key, moving_key)`` of element `i`."""
        i = int(i)
        if i < 0:
            raise IndexError(f"element index must be >= 0, got {i}")
        if not self.repeat:
            if i >= self.num_pairs:
                raise IndexError(f"element index {i} >= {self.num_pairs} pairs")
            p = int(self._perm(_EVAL_PERM_STREAM, 0, self.num_pairs)[i])
            s = int(np.searchsorted(self._starts, p, side="right")) - 1
            return self.subsets[s].pairs[p - int(self._starts[s])]
        batch, slot = divmod(i, self.composition_batch)
        s = int(self._slot_owner[slot])
        sub = self.subsets[s]
        epoch, pos = divmod(batch * sub.count + slot - sub.offset, len(sub.pairs))
        return sub.pairs[int(self._perm(s, epoch, len(sub.pairs))[pos])]

    def keys(self) -> list[str]:
        """Every subject key the stream can produce, sorted."""
        return sorted(set().union(*(s.pairs.subjects() for s in self.subsets)))


# --------------------------------------------------------------------------------------- validation


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DatasetError(f"{path}: HDF5 file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None


def check_subjects(desc, keys, image_size=None, read_float: bool = True) -> None:
    """Checks subjects without loading them: files open, groups exist, ``volume`` has the expected shape.

    Also checks that ``segmentation`` matches the volume shape and ``point`` is ``[P, 3]``. Volumes stored as
    floating point (our writers store uint8, which cannot hold NaN) are read one at a time and checked for NaN/inf
    when `read_float`.

    Args:
      desc: `Descriptor` or path. keys: subject keys. image_size: expected ``(D, H, W)`` (default: the descriptor's).

    Raises:
      DatasetError: the first problem, naming the HDF5 file and the key.
    """
    import h5py

    desc = _descriptor(desc)
    expected = tuple(image_size or desc.image_size)
    by_file: dict = {}
    for key in keys:
        path, inner = desc.file_for(key)
        by_file.setdefault(Path(path), []).append((key, inner))
    for path, entries in by_file.items():
        with _open_h5(path) as h5:
            for key, inner in entries:
                where = f"{path}: subject '{key}'"
                try:
                    grp = h5.get(inner)
                    if not isinstance(grp, h5py.Group):
                        raise DatasetError(f"{where} not found in the file (descriptor {desc.path})")
                    vol = grp.get("volume")
                    if not isinstance(vol, h5py.Dataset):
                        raise DatasetError(f"{where} has no 'volume' dataset")
                    if tuple(vol.shape) != expected:
                        raise DatasetError(
                            f"{where}: volume shape {tuple(vol.shape)} != image_size {list(expected)} of {desc.path}"
                        )
                    seg = grp.get("segmentation")
                    if seg is not None and tuple(seg.shape) != expected:
                        raise DatasetError(f"{where}: segmentation shape {tuple(seg.shape)} != {list(expected)}")
                    pts = grp.get("point")
                    if pts is not None and (len(pts.shape) != 2 or pts.shape[1] != 3):
                        raise DatasetError(f"{where}: point must be [P, 3], got shape {tuple(pts.shape)}")
                    if read_float and vol.dtype.kind in "fc":
                        read_subject(h5, inner.lstrip("/"), what=("volume",), source=str(path))
                except DatasetError:
                    raise
                except (OSError, KeyError, RuntimeError) as e:
                    raise DatasetError(f"{where}: unreadable ({e})") from None


# ------------------------------------------------------------------------------------------ reading


class _SubjectReader:
    """Reads subjects lazily: one h5py handle per file per thread, plus a small LRU cache of decoded subjects."""

    def __init__(self, desc: Descriptor, image_size, num_points: int, cache_size: int = 8):
        self.desc = desc
        self.image_size = tuple(image_size)
        self.num_points = num_points
        self.cache_size = cache_size
        self._local = threading.local()
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _handle(self, path: Path):
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if path not in handles:
            handles[path] = _open_h5(path)
        return handles[path]

    def subject(self, key: str) -> dict:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path, inner = self.desc.file_for(key)
        data = read_subject(self._handle(Path(path)), inner.lstrip("/"), source=str(path))
        if data["volume"].shape != self.image_size:
            raise DatasetError(
                f"{path}: subject '{key}': volume shape {data['volume'].shape} != image_size "
                f"{list(self.image_size)} of {self.desc.path}"
            )
        seg = data["segmentation"]
        if seg is not None and seg.shape != self.image_size:
            raise DatasetError(f"{path}: subject '{key}': segmentation shape {seg.shape} != {list(self.image_size)}")
        pts = np.full((self.num_points, 3), -1.0, np.float32)
        if data["point"] is not None:
            n = min(self.num_points, len(data["point"]))
            pts[:n] = data["point"][:n]
        out = {
            "volume": data["volume"],
            "segmentation": seg if seg is not None else np.zeros(self.image_size, np.int32),
            "has_seg": seg is not None,
            "point": pts,
        }
        if self.cache_size:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def element(self, stream: PairStream, index):
        fixed_key, moving_key = stream.pair(int(index))
        f, m = self.subject(fixed_key), self.subject(moving_key)
        return (f["volume"], m["volume"], f["segmentation"], m["segmentation"], f["point"], m["point"],
                np.asarray(fixed_key.encode()), np.asarray(moving_key.encode()),
                np.asarray(f["has_seg"] and m["has_seg"]))


def _resize(element: dict, src, dst) -> dict:
    """Resamples one element from grid `src` to grid `dst` (voxel centres aligned; trilinear / label-preserving)."""
    scale = [s / d for s, d in zip(src, dst)]  # source voxels per target voxel
    coords = (warp_ops.identity_grid(dst) + 0.5) * tf.constant(scale, tf.float32) - 0.5
    coords = coords[None]
    out = dict(element)
    for name in ("fixed", "moving"):
        out[name] = warp_ops.resample(element[name][None], coords)[0]
    for name in ("fixed_seg", "moving_seg"):
        out[name] = warp_ops.warp_labels(element[name][None], None, coords=coords)[0]
    for name in ("fixed_points", "moving_points"):
        p = element[name]
        moved = (p + 0.5) / tf.constant(scale, tf.float32) - 0.5
        out[name] = tf.where(tf.reduce_any(tf.equal(p, -1.0), -1, keepdims=True), p, moved)
    return out


def make_pair_dataset(desc, split: str, batch_size: int, seed: int = 0, augment=True, shuffle: bool = True,
                      repeat: bool = True, start_step: int = 0, input_context=None, image_size=None,
                      paired: bool = False, num_points: int = NUM_POINTS, num_parallel_calls=None,
                      validate: bool = True, cache_size: int = 8, keep=None) -> tf.data.Dataset:
    """Streams batches of registration pairs.

    Args:
      desc: `Descriptor` or path to a descriptor JSON.
      split: scheme name (``"1"``/``"train"``, ``"2"``/``"val"``, named schemes) or subset name.
      batch_size: batch size of this dataset (per replica when an `input_context` is given).
      seed: non-negative integer; drives the per-epoch permutations and the augmentation.
      augment: True (default `ldr_tf.data.augment.FFDParams`), an `FFDParams`, or False/None.
      shuffle, repeat: training: both True; evaluation: ``shuffle=False, repeat=False, augment=False`` yields every
        pair once in a fixed order (last batch may be smaller).
      start_step: skip this many batches, or training steps with an `input_context` (exact resume).
      input_context: optional ``tf.distribute.InputContext``: this pipeline yields its shard (module doc).
      image_size: optional ``(D, H, W)`` network grid; when it differs from the descriptor's, every volume is
        resampled (images trilinear, labels by `ldr_tf.ops.warp.warp_labels`, points rescaled) before augmentation.
      paired: neighbour pairing instead of all ordered pairs.
      num_points: landmarks per subject (padded with -1 / truncated).
      num_parallel_calls: parallel reads/augmentations (default ``tf.data.AUTOTUNE``); order stays deterministic.
      validate: check every subject of the split up front with `check_subjects` (metadata only, cheap).
      cache_size: decoded subjects kept in memory per pipeline (0 disables).
      keep: optional predicate ``keep(fixed_key, moving_key) -> bool`` restricting the pairs (`PairStream`).

    Returns:
      ``tf.data.Dataset`` of dicts: ``fixed``, ``moving`` ``[B, D, H, W, 1]`` float32 in [0, 1]; ``fixed_seg``,
      ``moving_seg`` ``[B, D, H, W]`` int32 (zeros without segmentation); ``fixed_points``, ``moving_points``
      ``[B, P, 3]`` float32, -1 = missing; ``aug_flow`` ``[B, D, H, W, 3]`` with
      ``moving(x) = moving_original(x + aug_flow(x))`` (zeros without augmentation); ``id1``, ``id2`` ``[B]``
      string keys; ``has_seg`` ``[B]`` bool (both sides have a segmentation); ``index`` ``[B]`` int64 element index.

    Raises:
      DatasetError: unreadable/missing files or subjects, shape mismatches (naming the file and key).
      ValueError: bad arguments.
    """
    desc = _descriptor(desc)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if int(start_step) != start_step or start_step < 0:
        raise ValueError(f"start_step: expected a non-negative integer, got {start_step}")
    if augment is True:
        ffd = aug_ops.FFDParams()
    elif augment is False or augment is None:
        ffd = None
    elif isinstance(augment, aug_ops.FFDParams):
        ffd = augment
    else:
        raise ValueError(f"augment: expected a bool or an FFDParams, got {augment!r}")
    workers, worker, replicas = 1, 0, 1
    if input_context is not None:
        workers, worker = int(input_context.num_input_pipelines), int(input_context.input_pipeline_id)
        replicas = int(getattr(input_context, "num_replicas_in_sync", workers))
        if replicas % workers:
            raise ValueError(f"input_context: {replicas} replicas do not divide into {workers} input pipelines")
    per_pipeline = replicas // workers  # batches of this pipeline consumed by one training step
    stream = PairStream(desc, split, seed, shuffle, repeat, paired, composition_batch=batch_size * replicas,
                        keep=keep)
    src = tuple(desc.image_size)
    dst = tuple(int(s) for s in image_size) if image_size is not None else src
    if len(dst) != 3 or min(dst) < 1:
        raise ValueError(f"image_size: expected three positive integers, got {image_size!r}")
    if validate:
        check_subjects(desc, stream.keys(), src)
    reader = _SubjectReader(desc, src, num_points, cache_size)
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls

    first = start_step * per_pipeline * batch_size
    if repeat:
        local = tf.data.Dataset.counter(first)
    else:
        n_local = max(0, -(-(stream.length - worker) // workers))
        local = tf.data.Dataset.range(first, n_local)
    index = local.map(lambda l: l * workers + worker)

    tout = [tf.float32, tf.float32, tf.int32, tf.int32, tf.float32, tf.float32, tf.string, tf.string, tf.bool]

    def load(i):
        out = tf.numpy_function(lambda k: reader.element(stream, k), [i], tout, stateful=False)
        vol = tf.TensorShape(src)
        shapes = [vol, vol, vol, vol, [num_points, 3], [num_points, 3], [], [], []]
        for t, s in zip(out, shapes):
            t.set_shape(s)
        f, m, fs, ms, fp, mp, id1, id2, has_seg = out
        element = {"fixed": f[..., None], "moving": m[..., None], "fixed_seg": fs, "moving_seg": ms,
                   "fixed_points": fp, "moving_points": mp, "id1": id1, "id2": id2, "has_seg": has_seg,
                   "index": i}
        if dst != src:
            element = _resize(element, src, dst)
        return element

    def augment_one(e):
        seeds = tf.stack([tf.constant(seed, tf.int64), e["index"]])[None]
        res = aug_ops.augment_moving(e["moving"][None], e["moving_seg"][None], e["moving_points"][None], seeds, ffd)
        e = dict(e)
        e["moving"], e["moving_seg"] = res["moving"][0], res["moving_seg"][0]
        e["moving_points"], e["aug_flow"] = res["moving_points"][0], res["flow"][0]
        return e

    ds = index.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.map(augment_one, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=repeat, num_parallel_calls=parallel, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
