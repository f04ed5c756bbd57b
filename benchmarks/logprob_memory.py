"""Peak memory and time of the logprob path: per-token logprobs + entropy + GRPO loss + backward, with
`core.policy.completion_logprobs` (chunked LM head under checkpointing) against the plain way (full logits,
then log-softmax, as `model(...).logits` gives them), at Qwen2.5-0.5B's head size with random weights.

    python benchmarks/logprob_memory.py                 # vocab 151,936, hidden 896, 8 x 512 tokens, CPU
    python benchmarks/logprob_memory.py --device cuda   # the same on a GPU
    python benchmarks/logprob_memory.py --smoke         # tiny sizes, seconds (what CI runs)

Each variant runs in its own subprocess, so one variant's peak cannot hide in the other's. Peak memory is
measured around the call only: on CPU the kernel's resident high-water mark (VmHWM) is reset through
/proc/self/clear_refs just before the call, and the peak is VmHWM after it minus the resident size before
it (weights and inputs excluded); on CUDA, torch.cuda.max_memory_allocated minus the allocation before it.
The backbone is a 1-layer Qwen2 (the head dominates at this vocabulary). Both variants must agree to 1e-5
on logprobs, entropies, loss and gradients; the script exits non-zero if they do not.
"""

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from core import algos  # noqa: E402
from core.policy import completion_logprobs, position_ids_from_mask, rows_per_chunk  # noqa: E402

FULL = dict(vocab=151_936, hidden=896, batch=8, completion=512, prompt=32)
SMOKE = dict(vocab=2048, hidden=64, batch=2, completion=32, prompt=8)


def build(sizes: dict, device: str):
    """A 1-layer Qwen2-shaped model (random weights, seed 0) and a batch: ids (N, L), mask (N, L), adv (N,)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    heads = max(1, sizes["hidden"] // 64)
    config = Qwen2Config(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 7) if heads % 7 == 0 else heads,
        intermediate_size=sizes["hidden"] * 4,
        max_position_embeddings=sizes["prompt"] + sizes["completion"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.to(device).train()
    g = torch.Generator().manual_seed(1)
    n, length = sizes["batch"], sizes["prompt"] + sizes["completion"]
    ids = torch.randint(0, sizes["vocab"], (n, length), generator=g)  # (N, L)
    mask = torch.ones(n, length, dtype=torch.long)  # (N, L)
    mask[0, :3] = 0  # some left padding, as in a real batch
    advantages = torch.randn(n, generator=g)  # (N,)
    return model, ids.to(device), mask.to(device), advantages.to(device)


def unchunked(model, ids, mask, t: int, entropy_rows: int = 128):
    """The plain way: the model's full (N, T, V) logits in float32, log-softmax, gather, and the entropy as
    a metric under no_grad, `entropy_rows` positions at a time as TRL's `entropy_from_logits` does (all at
    once, exp(log p) and its product would add two (N, T, V) temporaries to this baseline's peak)."""
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=t + 1
    ).logits[:, :-1]  # (N, T, V)
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, T, V)
    logp = logp_all.gather(-1, ids[:, -t:].unsqueeze(-1)).squeeze(-1)  # (N, T)
    with torch.no_grad():
        rows = logp_all.reshape(-1, logp_all.shape[-1])  # (N*T, V)
        entropy = torch.cat([-(part.exp() * part).sum(-1) for part in rows.split(entropy_rows)]).reshape(
            logp.shape
        )  # (N, T)
    return logp, entropy


def _rss_kib() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))


def worker(variant: str, sizes: dict, device: str, chunk_size: int, repeats: int, out: str) -> None:
    """One variant: `repeats` calls, each timed and with its own peak; results of the last saved to `out`."""
    torch.set_grad_enabled(True)
    model, ids, mask, advantages = build(sizes, device)
    t = sizes["completion"]
    loss_mask = mask[:, -t:].float()  # (N, T)
    # old logprobs near a uniform policy's, the same for both variants: the ratio, and so the loss, depends
    # on the logprobs each computes (with old = logp.detach() the loss would be the same whatever they are)
    g = torch.Generator().manual_seed(2)
    old_logp = (-math.log(sizes["vocab"]) + 0.05 * torch.randn(ids.shape[0], t, generator=g)).to(device)
    times, peaks = [], []
    warmup = 1 if device == "cuda" else 0  # CUDA's first call loads kernels and grows the allocator
    for call in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_kib()[0] * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        if variant == "chunked":
            logp, entropy = completion_logprobs(model, ids, mask, t, chunk_size=chunk_size)
        else:
            logp, entropy = unchunked(model, ids, mask, t)
        loss, _ = algos.policy_loss(logp, old_logp, advantages, loss_mask)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = _rss_kib()[1] * 1024 - before
        if call >= warmup:
            times.append(time.perf_counter() - start)
            peaks.append(peak)
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    torch.save(
        {
            "logp": logp.detach().cpu(),
            "entropy": entropy.detach().cpu(),
            "loss": loss.detach().cpu(),
            "grads": grads,
            "time": times,
            "peak": peaks,
        },
        out,
    )


def within_tolerance(errors: dict[str, float], tolerance: float = 1e-5) -> bool:
    """Every difference finite and at most `tolerance` (max() of the values would skip a NaN)."""
    return all(math.isfinite(v) and v <= tolerance for v in errors.values())


def run_variant(variant: str, args, sizes: dict, tmp: Path) -> dict:
    out = tmp / f"{variant}.pt"
    cmd = [sys.executable, __file__, "--worker", variant, "--out", str(out), "--device", args.device]
    cmd += [
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
        "--sizes",
        json.dumps(sizes),
    ]
    subprocess.run(cmd, check=True)
    return torch.load(out, weights_only=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk-size", type=int, default=1024, help="token positions per LM-head chunk")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per variant (median reported)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker; 0 = torch's default"
    )
    parser.add_argument("--worker", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, json.loads(args.sizes), args.device, args.chunk_size, args.repeats, args.out)
        return 0

    sizes = SMOKE if args.smoke else FULL
    print(
        f"logprobs + entropy + loss + backward: vocab {sizes['vocab']:,}, hidden {sizes['hidden']}, "
        f"{sizes['batch']} x {sizes['completion']} completion tokens (+{sizes['prompt']} prompt), "
        f"1-layer Qwen2 backbone, float32, {args.device}, chunk {rows_per_chunk(sizes['vocab'], args.chunk_size)} "
        f"positions (--chunk-size {args.chunk_size}), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = {v: run_variant(v, args, sizes, Path(tmp)) for v in ("unchunked", "chunked")}

    # logp and loss: absolute differences. The entropy (~12 nats, a sum of 151,936 float32 terms, ~2e-5
    # rounding in either path): relative to max(1, |value|). Each gradient: its largest difference relative
    # to its largest entry, for every parameter (the tied embedding / LM head's included).
    def gap(a, b):
        return (a - b).abs().max().item()

    chunked, plain = res["chunked"], res["unchunked"]
    errors = {
        "logp": gap(chunked["logp"], plain["logp"]),
        "entropy": ((chunked["entropy"] - plain["entropy"]).abs() / plain["entropy"].abs().clamp(min=1.0))
        .max()
        .item(),
        "loss": gap(chunked["loss"], plain["loss"]),
        "grads": max(
            gap(chunked["grads"][k], plain["grads"][k]) / max(plain["grads"][k].abs().max().item(), 1e-30)
            for k in plain["grads"]
        ),
    }
    print(f"{'path':<10} {'peak MiB':>10} {'time s':>8}")
    for v in ("unchunked", "chunked"):
        peak = statistics.median(res[v]["peak"]) / 2**20
        print(f"{v:<10} {peak:>10.0f} {statistics.median(res[v]['time']):>8.2f}")
    ratio = statistics.median(res["chunked"]["peak"]) / statistics.median(res["unchunked"]["peak"])
    within = within_tolerance(errors)
    target = (
        "target <= 0.25 at the full size; smoke sizes are too small to show it"
        if args.smoke
        else "target <= 0.25"
    )
    print(f"peak ratio chunked/unchunked: {ratio:.3f} ({target})")
    print(
        "max difference (logp, loss absolute; entropy relative to max(1, |value|); grads relative to their max): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + " (target <= 1e-5)"
    )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
