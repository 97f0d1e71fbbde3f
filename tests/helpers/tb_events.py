"""Reads run telemetry back with the writers' own counterparts, not with code of ours that could share a bug
with trd_jax.metrics: TensorBoard event files through TensorBoard's loader (the `tensorboard` package, a test
dependency only; no TensorFlow), W&B offline runs through wandb's Record protos."""

import json
import os
import struct
import time

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


def read_tb_scalars(path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar TensorBoard shows of an event file (or a directory of them),
    sorted by step then tag."""
    acc = EventAccumulator(os.fspath(path), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    rows = [(e.step, tag, e.value) for tag in acc.Tags()[SCALARS] for e in acc.Scalars(tag)]
    return sorted(rows, key=lambda r: r[:2])


def read_wandb_records(path, *, timeout: float = 30.0):
    """The Record protos of a W&B run file (`run-<id>.wandb`), waiting until its final `exit` record is there:
    wandb's service process completes the file after run.finish() has returned (at the latest when the
    process exits). wandb has no reader of the file in Python any more, so the container is split here: a
    7-byte header (":W&B", magic, version), then LevelDB's log format, 32 KiB blocks of chunks (crc32c u32,
    length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout} s: "
                                 f"{[r.WhichOneof('record_type') for r in records]}")
        time.sleep(0.05)


def _wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, i = [], b"", 7
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a chunk header is padding
            i += 32768 - i % 32768
            continue
        length, kind = struct.unpack("<HB", data[i + 4:i + 7])
        if i + 7 + length > len(data):  # still being written
            break
        pending += data[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return out


def wandb_history(records) -> list[tuple[int, str, object]]:
    """(step, key, value) of every logged value (W&B's own _step/_runtime/_timestamp left out)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or ".".join(item.nested_key)
                if not key.startswith("_"):
                    rows.append((r.history.step.num, key, json.loads(item.value_json)))
    return rows


def read_tb_events(path) -> list:
    """Every Event proto of one event file, in file order, as TensorBoard's loader decodes them."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return list(LegacyEventFileLoader(os.fspath(path)).Load())
