"""Target shards on disk: array_record files of msgpack rows, written atomically, with a manifest.

A shard holds the rows of one generation batch and is written to a temporary name, then renamed: a reader
(or a resumed writer) sees a whole shard or none. The manifest (manifest.json) says what produced the
targets (the generation settings, the models' and tokenizer's hashes, k) and is checked before a
generation resumes into the folder or a training run reads it; its counts are rewritten after each shard.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from flax import serialization

from trd_jax.json_files import read_json_object
from trd_jax.metrics import atomic_write_json

MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{5})\.array_record$")

# Per row: what the student trains on and what the teacher said about each response position.
ROW_FIELDS = ("prompt", "response", "topk_ids", "topk_logp", "tail", "token_logp", "source", "y_o_reward",
              "y_r_reward", "example_id")


def round_dir(directory: str, r: int) -> str:
    """Round r's folder of a multi-round run (offline/rounds.py)."""
    return os.path.join(directory, f"round-{r:03d}")


def shard_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"shard-{index:05d}.array_record")


def finished_shards(directory: str) -> list[int]:
    """Indices of the complete shards in `directory` (temporary files of an interrupted write excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := _SHARD.match(name)))


def write_shard(directory: str, index: int, rows: list[dict]) -> str:
    """Writes `rows` (dicts of ROW_FIELDS) as shard `index`, atomically; returns its path."""
    path = shard_path(directory, index)
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
        for row in rows:
            missing = [f for f in ROW_FIELDS if f not in row]
            if missing:
                raise ValueError(f"shard {index}: a row lacks {', '.join(missing)}")
            writer.write(serialization.msgpack_serialize({f: row[f] for f in ROW_FIELDS}))
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def read_shard(path: str) -> list[dict]:
    reader = ArrayRecordReader(path)
    try:
        return [_restore(serialization.msgpack_restore(r)) for r in reader.read_all()]
    finally:
        reader.close()


def _restore(row: dict) -> dict:
    return {k: (np.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def decode_row(record: bytes) -> dict:
    return _restore(serialization.msgpack_restore(record))


def open_rows(directory: str, *, seed: int):
    """The rows of every finished shard as a GrainPromptIterator (next(n), state(), restore()): grain's
    deterministic shuffle, reshuffled every epoch, its position carried through checkpoints."""
    import grain

    from trd_jax.data.grain_source import GrainPromptIterator

    if read_manifest(directory) is None:
        raise ValueError(f"offline.dir={directory}: no {MANIFEST} (generate the targets first: mode=generate)")
    found = finished_shards(directory)
    if not found:
        raise ValueError(f"offline.dir={directory}: no finished shard")
    source = grain.sources.ArrayRecordDataSource([shard_path(directory, i) for i in found])
    return GrainPromptIterator(source, seed=seed, decode=decode_row)


def iter_rows(directory: str) -> Iterator[dict]:
    """Every row of every finished shard, in shard order."""
    for index in finished_shards(directory):
        yield from read_shard(shard_path(directory, index))


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    return read_json_object(path) if os.path.exists(path) else None


def check_or_write_manifest(directory: str, identity: dict, *, write: bool = True) -> dict:
    """The folder's manifest: written from `identity` (what decides the targets: settings, model and tokenizer
    hashes, k) when new; when it exists, its identity must be the same, else an error naming the fields
    that differ (the folder's shards came from something else). write=False (processes other than the
    writer) checks and writes nothing."""
    found = read_manifest(directory)
    if found is None:
        manifest = {"identity": identity, "counts": {"shards": 0, "rows": 0}}
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
