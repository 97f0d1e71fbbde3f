"""Content manifests of checkpoint steps: what a checkpoint held when it was written, checked before it is
loaded.

A step folder `<dir>/<step>` gets `trd_manifest.json` once orbax has finalised it: every file below the
folder with its size and SHA-256, written last and atomically (a temporary file renamed into place). A
restore verifies the newest step first; any changed byte (even one that leaves the arrays decodable, or the
meta JSON valid), a missing or extra file fails it, and the run goes back to the newest step that verifies.
Failed steps are moved aside into `<dir>.corrupt/`, never deleted.

Hashing runs on a background thread of the Checkpointer (bench/checkpoint_hash.py measures its cost), so a
save does not wait for it; a step whose manifest was never written (a kill between the save and its
manifest) counts as unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import NamedTuple

MANIFEST = "trd_manifest.json"


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                out.append(rel)
    return sorted(out)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str) -> dict:
    """Hashes every file of a finalised step folder and writes its manifest atomically; returns it."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": _digest(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    manifest = {"version": 1, "files": files}
    tmp = os.path.join(step_dir, f"{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


class Verdict(NamedTuple):
    ok: bool
    reason: str  # "" when ok; else what failed, naming the file ("no manifest" when none was written)


def verify(step_dir: str) -> Verdict:
    """Whether the step folder holds exactly the files its manifest lists, with their sizes and hashes."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return Verdict(False, "no manifest")
    try:
        with open(path) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Verdict(False, f"{MANIFEST} unreadable ({e})")
    present = set(_files(step_dir))
    for rel in sorted(set(listed) - present):
        return Verdict(False, f"{rel}: missing")
    for rel in sorted(present - set(listed)):
        return Verdict(False, f"{rel}: not in the manifest")
    for rel, want in sorted(listed.items()):
        full = os.path.join(step_dir, rel)
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return Verdict(False, f"{rel}: {size} bytes, {want['bytes']} when written")
        if _digest(full) != want["sha256"]:
            return Verdict(False, f"{rel}: content changed since it was written (SHA-256 differs)")
    return Verdict(True, "")


def set_aside(directory: str, step: int) -> str:
    """Moves `<directory>/<step>` into `<directory>.corrupt/<step>-<unix time>`; returns the new path."""
    target_dir = directory.rstrip(os.sep) + ".corrupt"
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    shutil.move(os.path.join(directory, str(step)), target)
    return target
