"""python -m trd_jax.data.builders BUILDER --name NAME --manual-dir DIR --data-dir DIR [--split S=GLOB ...]"""

from __future__ import annotations

import argparse

from trd_jax.data.builders import BUILDERS, build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trd_jax.data.builders", description=__doc__)
    p.add_argument("builder", choices=sorted(BUILDERS))
    p.add_argument("--name", required=True, help="dataset name: its folder under <data-dir>/<builder>/")
    p.add_argument("--manual-dir", required=True, help="folder holding the source files")
    p.add_argument("--data-dir", required=True, help="TFDS data dir to write into")
    p.add_argument("--split", action="append", default=[], metavar="SPLIT=GLOB",
                   help="files of a split, relative to --manual-dir (repeatable); default: train*, test*")
    p.add_argument("--keep-duplicates", action="store_true", help="keep repeated examples")
    p.add_argument("--keep-dapo-instruction", action="store_true", help="keep DAPO's prompt wrapper")
    p.add_argument("--overwrite", action="store_true", help="rebuild a dataset built from other files")
    args = p.parse_args(argv)
    splits: dict[str, list[str]] = {}
    for item in args.split:
        split, sep, pattern = item.partition("=")
        if not sep or not split or not pattern:
            p.error(f"--split {item!r}: expected SPLIT=GLOB")
        splits.setdefault(split, []).append(pattern)
    out = build(args.builder, name=args.name, manual_dir=args.manual_dir, data_dir=args.data_dir,
                splits=splits or None, overwrite=args.overwrite, drop_duplicates=not args.keep_duplicates,
                strip_dapo_instruction=not args.keep_dapo_instruction)
    print(out)


if __name__ == "__main__":
    main()
