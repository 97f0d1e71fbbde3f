"""Rollout throughput: trd_jax's sampler against transformers' `generate`, side by side in one run.

    python bench/rollout.py                       # random 4-layer d=256 Llama, batch 16 and 64
    python bench/rollout.py --model DIR           # any local HF folder, e.g. converted SmolLM2-135M
    python bench/rollout.py --batches 16 --repeats 5
    python bench/rollout.py --grid                # the issue-19 grid: vocab 2k..152k x batch 16, 64 x sampled, greedy

Both generate exactly --new tokens per row (no EOS stop) from the same random prompts of --prompt
tokens, in float32 on this CPU; transformers uses its default dynamic KV cache. Each side runs in its
own child process, one after the other, so that neither framework's thread pool competes with the
other's. We report the median of --repeats timed calls after one warm-up call (our compile time is
excluded from the median and printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from trd_jax.models.config import ModelConfig  # noqa: E402
from trd_jax.models.hf_io import load_hf  # noqa: E402
from trd_jax.sampling import Sampler, SamplingConfig  # noqa: E402


def random_llama(folder: str, vocab: int) -> str:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and, for us, compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_ours(args, path: str, prompts: np.ndarray) -> dict:
    lm = load_hf(path)
    graphdef, params = nnx.split(lm)
    sampler = Sampler(graphdef, eos_ids=(), pad_id=0)
    sampling = SamplingConfig(temperature=args.temperature)
    prompt_lists = [list(map(int, row)) for row in prompts]
    t0 = time.perf_counter()
    sampler(params, prompt_lists, args.new, sampling=sampling, key=0)
    compile_s = time.perf_counter() - t0

    def ours():
        out = sampler(params, prompt_lists, args.new, sampling=sampling, key=1)
        assert out.tokens.shape == (len(prompts), args.new)

    return dict(seconds=median_time(ours, args.repeats), compile_s=compile_s)


def run_theirs(args, path: str, prompts: np.ndarray) -> dict:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                              min_new_tokens=args.new, top_k=None, top_p=None, pad_token_id=0, **kw)
        assert out.shape == (len(prompts), args.prompt + args.new)

    return dict(seconds=median_time(theirs, args.repeats), threads=torch.get_num_threads())


def child(args) -> None:
    cfg = json.load(open(os.path.join(args.child_model, "config.json")))
    prompts = np.random.default_rng(args.batch).integers(1, cfg["vocab_size"], size=(args.batch, args.prompt))
    run = run_ours if args.child == "ours" else run_theirs
    print("RESULT " + json.dumps(run(args, args.child_model, prompts)), flush=True)


def spawn(args, side: str, path: str, batch: int, temperature: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--child-model", path, "--batch", str(batch),
           "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats),
           "--temperature", str(temperature)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{side} benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local HF folder (default: a random 4-layer d=256 Llama)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000], help="vocabularies of the random model")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="0 is greedy")
    ap.add_argument("--grid", action="store_true",
                    help="vocab 2048 8192 32000 151936, temperature 1 and 0 (overrides --vocab and --temperature)")
    ap.add_argument("--child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.temperature = args.temperature[0]
        return child(args)
    if args.grid:
        args.vocab, args.temperature = [2048, 8192, 32000, 151936], [1.0, 0.0]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; prompt {args.prompt}, {args.new} new tokens, float32, "
          f"median of {args.repeats}")
    print(f"{'model':<44} {'sampling':>9} {'batch':>5} {'trd_jax tok/s':>14} {'transformers tok/s':>19} "
          f"{'ratio':>6} {'our compile s':>14}")
    ratios = []
    for vocab in ([None] if args.model else args.vocab):
        tmp = tempfile.TemporaryDirectory()
        path = args.model or random_llama(tmp.name, vocab)
        cfg = ModelConfig.from_hf_dir(path)
        name = (f"{os.path.basename(os.path.normpath(path)) if args.model else 'random Llama'} "
                f"({cfg.num_layers}L d={cfg.hidden_size} V={cfg.vocab_size}, {cfg.num_params / 1e6:.1f}M)")
        for temperature in args.temperature:
            for batch in args.batches:
                ours = spawn(args, "ours", path, batch, temperature)
                theirs = spawn(args, "theirs", path, batch, temperature)
                tok = batch * args.new
                ratio = theirs["seconds"] / ours["seconds"]
                ratios.append(ratio)
                sampling = "greedy" if temperature == 0 else f"T={temperature:g}"
                print(f"{name:<44} {sampling:>9} {batch:>5} {tok / ours['seconds']:>14.0f} "
                      f"{tok / theirs['seconds']:>19.0f} {ratio:>6.2f} {ours['compile_s']:>14.1f}", flush=True)
        tmp.cleanup()
    print(f"ratio over {len(ratios)} cells: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
          f"max {max(ratios):.2f}; at least 3x in {sum(r >= 3 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
