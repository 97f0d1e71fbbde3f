"""The shared TFDS builder: users' files from a manual directory -> array_record splits of text features.

Nothing is downloaded. TFDS writes into an ``incomplete.*`` folder next to the final one and renames it
only when every split was generated, so a build that fails on a bad row leaves no dataset behind. The
stored order of each split is the files' order (shuffling is disabled in the builder): readers shuffle,
and evaluation sets keep the order the user gave them.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

from trd_jax.data.builders.files import Record, fingerprint, read_records, resolve_splits

FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
    """A dataset built from local files. ``name`` names the dataset (its folder under the builder's).

    splits: {split: [file name or glob, relative to the manual dir]}; None: every file whose name starts
      with one of the builder's default split names ("train*", "test*").
    drop_duplicates: drop an example whose fields other than the id repeat an earlier one's in the same
      split (DAPO-Math-17k's parquet holds each of its ~17k problems about 100 times).
    strip_dapo_instruction: math only: remove DAPO's "Solve the following math problem step by step..."
      wrapper from a problem that has both its exact opening and closing sentences, so that every problem
      is bare text and the task adds its own answer instruction.
    """

    splits: Mapping[str, Sequence[str]] | None = None
    drop_duplicates: bool = True
    strip_dapo_instruction: bool = True

    def options(self) -> dict[str, Any]:
        """The settings that change the built data (recorded with it, compared when it is reused)."""
        return {"drop_duplicates": self.drop_duplicates, "strip_dapo_instruction": self.strip_dapo_instruction}


_DEFAULT_CONFIG = LocalFilesConfig(name="default")


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders: subclasses name their ``FEATURES`` (all text) and turn one source row into
    them in ``parse``. Not registered with TFDS (``skip_registration``): the names are generic, and built
    datasets are read back from their folder (``tfds.builder_from_directory``), which needs no class."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the dataset's files (.jsonl, .json or .parquet) in the manual directory "
        "(tfds.download.DownloadConfig(manual_dir=...)) and name each split's files in the builder config, "
        "or name them train*/test*.")
    FEATURES: ClassVar[tuple[str, ...]]
    DEFAULT_SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        # TFDS 4.9's own lookup goes through the importlib_resources backport, which it installs only on
        # Python < 3.9, and fails without it for any builder defined in a package; the class's file is
        # all TFDS uses it for (a checksums file beside it: there is none, nothing is downloaded).
        return epath.Path(inspect.getfile(cls))

    @property
    def config(self) -> LocalFilesConfig:
        cfg = self.builder_config
        if cfg is None:
            return _DEFAULT_CONFIG
        if not isinstance(cfg, LocalFilesConfig):
            raise TypeError(f"{type(self).__name__} needs a LocalFilesConfig, got {type(cfg).__name__}")
        return cfg

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({name: tfds.features.Text() for name in self.FEATURES}),
            disable_shuffling=True,  # keep file order; see the module docstring
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS reports a missing or empty manual dir with an assert
            raise FileNotFoundError(str(e)) from None
        files = resolve_splits(manual_dir, self.config.splits, self.DEFAULT_SPLITS)
        # Recorded in metadata.json: build() compares them before reusing a built dataset.
        self.info.metadata["sources"] = fingerprint(files, manual_dir)
        self.info.metadata["options"] = self.config.options()
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
        seen_content: set[bytes] = set()
        seen_ids: dict[str, str] = {}  # id -> "file, row" of its first example
        key = rows = 0
        for path in paths:
            for record in read_records(path):
                rows += 1
                example = self.parse(record)
                if self.config.drop_duplicates:
                    content = {k: v for k, v in example.items() if k != "id"}
                    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()
                    if digest in seen_content:
                        continue
                    seen_content.add(digest)
                first = seen_ids.setdefault(example["id"], f"{record.path}, {record.where}")
                if first != f"{record.path}, {record.where}":
                    raise record.error("id", f"id {example['id']!r} already used by {first}")
                # The key only orders examples (shuffling is off); the running count keeps it unique.
                yield key, example
                key += 1
        if key == 0:  # TFDS would fail later with an assertion that names no file
            raise ValueError(f"{', '.join(paths)}: no examples" + (f" ({rows} rows, all duplicates)" if rows else ""))

    @abc.abstractmethod
    def parse(self, record: Record) -> dict[str, str]:
        """The features of one source row; a ValueError from ``record.error`` when the row is invalid."""


def dataset_dir(builder: type[LocalFilesBuilder], name: str, data_dir: str) -> str:
    """Where ``build`` puts the dataset: <data_dir>/<builder name>/<name>/<version>."""
    return os.path.join(data_dir, builder.name, name, str(builder.VERSION))


def build(builder: type[LocalFilesBuilder], *, name: str, manual_dir: str, data_dir: str,
          splits: Mapping[str, Sequence[str]] | None = None, overwrite: bool = False,
          **options: Any) -> str:
    """Builds dataset ``name`` from the files in ``manual_dir`` and returns its folder.

    A dataset already built under that name from the same files (same bytes) and options is reused; one
    built from other files or options raises ValueError unless ``overwrite`` (then it is rebuilt, and
    replaced only once the new build succeeded). ``options``: the other LocalFilesConfig fields.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_', '.', '-'")
    manual_dir, data_dir = os.path.expanduser(manual_dir), os.path.expanduser(data_dir)
    config = LocalFilesConfig(name=name, splits=splits, **options)
    out = dataset_dir(builder, name, data_dir)
    if not os.path.exists(os.path.join(out, "dataset_info.json")):
        return _prepare(builder, config, manual_dir, data_dir)
    if not overwrite:
        _check_reusable(builder, out, config, manual_dir)
        return out
    # TFDS's own overwrite deletes the old dataset before generating the new one, so a bad row would
    # leave none: build beside it instead (same file system, so the renames are cheap) and swap at the end.
    os.makedirs(data_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".rebuild-", dir=data_dir)
    try:
        fresh = _prepare(builder, config, manual_dir, staging)
        os.rename(out, os.path.join(staging, "replaced"))
        os.rename(fresh, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _prepare(builder: type[LocalFilesBuilder], config: LocalFilesConfig, manual_dir: str, data_dir: str) -> str:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    b = builder(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
    b.download_and_prepare(download_config=download_config)
    return os.fspath(b.data_dir)


def _check_reusable(builder: type[LocalFilesBuilder], out: str, config: LocalFilesConfig,
                    manual_dir: str) -> None:
    try:
        with open(os.path.join(out, "metadata.json")) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError):
        recorded = {}
    files = resolve_splits(manual_dir, config.splits, builder.DEFAULT_SPLITS)
    current = {"sources": fingerprint(files, manual_dir), "options": config.options()}
    if recorded != current:
        raise ValueError(f"{out} was built from other files or options than {manual_dir} with these "
                         f"settings now give; build with overwrite=True to rebuild it")
