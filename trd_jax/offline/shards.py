"""Target shards on disk: each shard a TFDS dataset (the TargetShard builder, array_record, no TensorFlow), with
a manifest for the folder.

A shard holds the rows of one generation batch: <dir>/shard-<i>/trd_targets/1.0.0, a dataset with one split
("train") whose features are ROW_FIELDS, typed (token ids and top-k tensors, texts, grades), so that any TFDS
or grain reader can open it (tfds.builder_from_directory). TFDS prepares a dataset in an incomplete.* folder
and renames it when done: a reader (or a resumed writer) sees a whole shard or none. A batch whose rows
were all dropped leaves a marker file instead (TFDS writes no empty split). The manifest (manifest.json)
says what produced the targets (the generation settings, the models' and tokenizer's hashes, k) and is
checked before a generation resumes into the folder or a training run reads it; its counts are rewritten
after each shard.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from trd_jax.json_files import read_json_object
from trd_jax.metrics import atomic_write_json

MANIFEST = "manifest.json"
BUILDER = "trd_targets"
SHARD_VERSION = "1.0.0"
SPLIT = "train"
_SHARD = re.compile(r"^shard-(\d{5,})(\.empty)?$")

# Per row: what the student trains on and what the teacher said about each response position.
ROW_FIELDS = ("prompt", "response", "topk_ids", "topk_logp", "tail", "token_logp", "source", "y_o_reward",
              "y_r_reward", "example_id")
_TEXT = ("source", "example_id")


def _features(k: int):
    import tensorflow_datasets as tfds

    def tensor(shape, dtype):
        return tfds.features.Tensor(shape=shape, dtype=dtype)

    return tfds.features.FeaturesDict({
        "prompt": tensor((None,), np.int32), "response": tensor((None,), np.int32),
        "topk_ids": tensor((None, k), np.int32), "topk_logp": tensor((None, k), np.float32),
        "tail": tensor((None,), np.float32), "token_logp": tensor((None,), np.float32),
        "source": tfds.features.Text(), "example_id": tfds.features.Text(),
        "y_o_reward": tfds.features.Scalar(dtype=np.float32), "y_r_reward": tfds.features.Scalar(dtype=np.float32)})


@functools.cache
def _builder_class():
    """TargetShard, defined on first use: importing TFDS is slow, and only writers need the class (readers
    open a shard from its folder)."""
    import tensorflow_datasets as tfds
    from etils import epath

    class TargetShard(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One shard of stored distillation targets (trd_jax/offline): per trained row, the prompt and
        trajectory token ids, the teacher's top-k ids and log-probs, tail log-mass and token log-prob at each
        response position, where the trajectory came from (y_r or y_o), both grades and the example's id."""

        name = BUILDER
        VERSION = tfds.core.Version(SHARD_VERSION)
        RELEASE_NOTES = {SHARD_VERSION: "First version."}

        def __init__(self, *, rows: list[dict], k: int, **kwargs):
            self._rows, self._k = rows, k
            super().__init__(**kwargs)

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):  # as data/builders/base.py: TFDS's own lookup fails for a class in a package
            return epath.Path(inspect.getfile(cls))

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                         features=_features(self._k), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            for key, row in enumerate(self._rows):
                yield key, {f: row[f] for f in ROW_FIELDS}

    return TargetShard


def round_dir(directory: str, r: int) -> str:
    """Round r's folder of a multi-round run (offline/rounds.py)."""
    return os.path.join(directory, f"round-{r:03d}")


def _shard_root(directory: str, index: int) -> str:
    return os.path.join(directory, f"shard-{index:05d}")


def round_complete(directory: str, r: int, steps_per_round: int) -> bool:
    """Whether round r's folder holds all its steps_per_round shards."""
    return len(finished_shards(round_dir(directory, r))) >= steps_per_round


def shard_path(directory: str, index: int) -> str:
    """Shard `index`'s dataset folder (TFDS's layout: <data_dir>/<builder>/<version>)."""
    return os.path.join(_shard_root(directory, index), BUILDER, SHARD_VERSION)


def _empty_marker(directory: str, index: int) -> str:
    return _shard_root(directory, index) + ".empty"


def finished_shards(directory: str) -> list[int]:
    """Indices of the complete shards in `directory` (TFDS's incomplete.* folders of an interrupted write
    excluded)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _SHARD.match(name)
        if m and (m.group(2) or os.path.isdir(shard_path(directory, int(m.group(1))))):
            found.append(int(m.group(1)))
    return sorted(found)


def write_shard(directory: str, index: int, rows: list[dict], *, k: int) -> str:
    """Writes `rows` (dicts of ROW_FIELDS; top-k arrays [n, k]) as shard `index`, atomically; returns its folder."""
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"shard {index}: a row lacks {', '.join(missing)}")
    os.makedirs(directory, exist_ok=True)
    if not rows:  # every row of the batch dropped: nothing to train, but the shard is done
        with open(_empty_marker(directory, index) + ".tmp", "w"):
            pass
        os.replace(_empty_marker(directory, index) + ".tmp", _empty_marker(directory, index))
        return _empty_marker(directory, index)
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    scratch = tempfile.mkdtemp(prefix=".downloads-", dir=directory)  # TFDS's download folder: unused here
    try:
        builder = _builder_class()(rows=rows, k=k, data_dir=_shard_root(directory, index), file_format="array_record")
        builder.download_and_prepare(download_dir=scratch,
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return shard_path(directory, index)


def _shard_files(directory: str, index: int) -> tuple[list[str], object]:
    """(array_record files, TFDS features) of a finished non-empty shard, from its own dataset_info."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(shard_path(directory, index))
    return [os.fspath(p) for p in builder.info.splits[SPLIT].filepaths], builder.info.features


def _decoder(features):
    def decode(record: bytes) -> dict:
        row = features.deserialize_example_np(record)
        return {f: (row[f].decode("utf-8") if f in _TEXT else
                    float(row[f]) if f.endswith("_reward") else np.asarray(row[f])) for f in ROW_FIELDS}
    return decode


def read_shard(directory: str, index: int) -> list[dict]:
    if os.path.exists(_empty_marker(directory, index)):
        return []
    from array_record.python.array_record_module import ArrayRecordReader

    files, features = _shard_files(directory, index)
    decode, rows = _decoder(features), []
    for path in files:
        reader = ArrayRecordReader(path)
        try:
            rows.extend(decode(r) for r in reader.read_all())
        finally:
            reader.close()
    return rows


def open_rows(directory: str, *, seed: int):
    """The rows of every finished shard as a GrainPromptIterator (next(n), state(), restore()): grain's
    deterministic shuffle, reshuffled every epoch, its position carried through checkpoints."""
    import grain

    from trd_jax.data.grain_source import GrainPromptIterator

    if read_manifest(directory) is None:
        raise ValueError(f"offline.dir={directory}: no {MANIFEST} (generate the targets first: mode=generate)")
    found = [i for i in finished_shards(directory) if not os.path.exists(_empty_marker(directory, i))]
    if not found:
        raise ValueError(f"offline.dir={directory}: no finished shard with rows")
    files, features = [], None
    for i in found:
        paths, features = _shard_files(directory, i)
        files.extend(paths)
    return GrainPromptIterator(grain.sources.ArrayRecordDataSource(files), seed=seed, decode=_decoder(features))


def iter_rows(directory: str) -> Iterator[dict]:
    """Every row of every finished shard, in shard order."""
    for index in finished_shards(directory):
        yield from read_shard(directory, index)


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    return read_json_object(path) if os.path.exists(path) else None


def check_or_write_manifest(directory: str, identity: dict, *, write: bool = True, record: dict | None = None) -> dict:
    """The folder's manifest: written from `identity` (what decides the targets: settings, model and tokenizer
    hashes, k) when new, with `record` beside it (for the reader: the whole config, the model folders; not
    compared); when it exists, its identity must be the same, else an error naming the fields that differ
    (the folder's shards came from something else). write=False (processes other than the writer) checks and
    writes nothing."""
    found = read_manifest(directory)
    if found is None:
        manifest = {"identity": identity, **(record or {}), "counts": {"shards": 0, "rows": 0}}
        if write:
            os.makedirs(directory, exist_ok=True)
            atomic_write_json(os.path.join(directory, MANIFEST), manifest)
        return manifest
    differ = sorted(k for k in set(found["identity"]) | set(identity)
                    if found["identity"].get(k) != identity.get(k))
    if differ:
        raise ValueError(f"offline.dir={directory}: its targets were generated with other settings "
                         f"({', '.join(differ)} differ); use a new folder or the same settings")
    return found


def update_counts(directory: str, manifest: dict, **counts) -> None:
    manifest["counts"] = {**manifest.get("counts", {}), **counts}
    atomic_write_json(os.path.join(directory, MANIFEST), manifest)
