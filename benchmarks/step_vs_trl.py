"""A GRPO step of our trainer against TRL's `GRPOTrainer` on the same model, prompts and work, in one run.

    python benchmarks/step_vs_trl.py                      # 8 CPU settings, 5 measured steps per side each
    python benchmarks/step_vs_trl.py --settings beta0-mu1-lora0 --steps 9
    python benchmarks/step_vs_trl.py --smoke              # 1 setting, 1 step, tiny sizes (`make test-slow`)
    python benchmarks/step_vs_trl.py --gpu                # Qwen2.5-0.5B shape, random weights, bf16, cuda

A step: 8 prompts x G = 8 completions of exactly 64 tokens (eos suppressed before 64, so both sides generate
the same number of tokens), temperature 1.0, then mu optimizer updates on the 64 completions (one micro-batch
each), a reference forward when beta > 0 and, for TRL, an old-logprob forward when mu > 1 (ours keeps the
first epoch's log-probs as the old ones: the worker prints each side's passes). TRL runs mu trainer
steps per GRPO step (`num_iterations=mu` reuses one generation batch). Settings: beta {0, 0.04} x mu {1, 2} x
LoRA {off, on}. The model is a Qwen2 (hidden 256, 4 layers) with the offline character tokenizer of
core/tiny.py, random weights (seed 0), saved once and loaded by both sides.

Each side runs in its own worker process and the driver asks them for a step in turn, A B B A ..., after
`--warmup` unmeasured steps each: the two sides see the same machine load. Reported per setting: median step
time, completion tokens/s (counted from each side's completion mask), the peak resident memory of the
worker (its VmHWM, read before the reset at the end of set-up and at the end; not `ru_maxrss`, which a
child started by vfork inherits from the driver) and its growth during the steps (VmHWM reset through
/proc/self/clear_refs after set-up), and ours/TRL. Every
worker also counts the decoder's work per step (token positions run with and without autograd, decode
calls), printed so that the two sides' work can be compared: ours runs each group's prompt once in the
training passes (`completion_logprobs` shares it), so it trains on fewer positions for the same result.

Precision: `--dtype float32` (default) runs both sides in float32; `--dtype bfloat16` runs our side under
bf16 autocast (`GRPOConfig.autocast`) and TRL with `bf16=True`. TRL's gradient checkpointing (its default)
is turned off so both sides do the same passes; `--trl-checkpointing` keeps it. `--compile-decode` runs our
decode step through torch.compile (`GRPOConfig.compile_decode`); the compile happens in the warm-up steps,
so give it two (the second prompt width recompiles with dynamic shapes).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

TAG = "@@bench "  # the workers' protocol lines on stdout; anything else they print is passed through
SETTINGS = [f"beta{beta}-mu{mu}-lora{lora}" for beta in ("0", "0.04") for mu in (1, 2) for lora in (0, 1)]
CPU = dict(
    hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, vocab=None, tokens=64, prompts=8, group=8
)
SMOKE = dict(
    hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, vocab=None, tokens=8, prompts=2, group=4
)
# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights: nothing is downloaded.
GPU = dict(
    hidden=896,
    layers=24,
    heads=14,
    kv_heads=2,
    intermediate=4864,
    vocab=151_936,
    tokens=512,
    prompts=8,
    group=8,
)
# dense bf16 tensor-core peaks by device-name substring, the first match counts (NVIDIA data sheets)
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def parse_setting(name: str) -> tuple[float, int, bool]:
    match = re.fullmatch(r"beta(\d+(?:\.\d+)?)-mu(\d+)-lora([01])", name)
    if match is None:
        raise SystemExit(
            f"bad setting {name!r}; expected e.g. beta0.04-mu2-lora1 (valid: {', '.join(SETTINGS)})"
        )
    return float(match[1]), int(match[2]), match[3] == "1"


def make_prompts(n: int) -> list[str]:
    """Short arithmetic questions; both sides get the same texts in the same order."""
    return [f"Question {i}: what is {7 * i % 97} plus {13 * i % 89}? Answer:" for i in range(n)]


def digit_reward(completion: str, example: dict | None = None) -> float:
    """Fraction of digits in the completion: a pure, cheap reward with spread, the same for both sides."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def build_model_dir(path: Path, sizes: dict) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from core.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer(make_prompts(64) + ["0123456789 +-=?"])
    config = Qwen2Config(
        vocab_size=sizes["vocab"] or len(tokenizer),
        hidden_size=sizes["hidden"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        intermediate_size=sizes["intermediate"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Workers: one per side, driven over stdin/stdout
# ---------------------------------------------------------------------------------------------------


def _send(**message) -> None:
    sys.stdout.write(TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def _outside_compiled_graphs(function):
    """`function` run by torch.compile's graphs as a call out (`--compile-decode`). Traced instead, a hook
    that counts would have its changing counts as guards, and every call would recompile."""
    import torch

    return torch.compiler.disable(function)


class PassCounter:
    """Counts the decoder stack's work per step: token positions run with autograd (the trained passes),
    token positions of multi-token passes without autograd (prefill, old logprobs, the reference), and
    decode calls (one new token per row, with a KV cache). Positions rather than calls, so that a pass that
    runs each group's prompt once (ours) is counted by the work it does."""

    def __init__(self, models: list):
        self.counts = {"grad_positions": 0, "nograd_positions": 0, "decode": 0}
        for model in models:  # the policy, and the reference model where it is a separate copy
            if model is None:
                continue
            lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            lm.get_decoder().register_forward_pre_hook(self.hook, with_kwargs=True)

    @_outside_compiled_graphs
    def hook(self, module, args, kwargs) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        if torch.is_grad_enabled():
            self.counts["grad_positions"] += ids.shape[0] * ids.shape[1]
        elif ids.shape[1] > 1:
            self.counts["nograd_positions"] += ids.shape[0] * ids.shape[1]
        else:
            self.counts["decode"] += 1

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return out


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


_SETUP_KIB: dict[str, int] = {}  # this worker's resident size and high-water mark at the end of set-up


def _setup_done() -> None:
    import torch

    _SETUP_KIB.update(rss=_status_kib("VmRSS"), hwm=_status_kib("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: growth is measured from here
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
    _send(event="ready", setup_rss_kib=_SETUP_KIB["rss"])


def _finish() -> None:
    import torch

    hwm = _status_kib("VmHWM")
    _send(
        event="done",
        peak_rss_kib=max(_SETUP_KIB["hwm"], hwm),
        step_growth_kib=hwm - _SETUP_KIB["rss"],
        # on a GPU, the device memory the steps reached (weights and optimizer state included)
        peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20 if _cuda_in_use() else None,
    )
    sys.stdout.flush()
    os._exit(0)  # TRL's train loop is blocked inside a callback; nothing to clean up


def ours_worker(args, sizes: dict, beta: float, mu: int, lora: bool) -> None:
    import torch

    from core.policy import LoraSettings, load_policy
    from core.rewards import Rubric
    from core.trainer import GRPOConfig, GRPOTrainer

    dtype = "bfloat16" if args.gpu else "float32"
    model, tokenizer = load_policy(
        args.model_dir, lora=LoraSettings(r=16, alpha=32) if lora else None, dtype=dtype, device=args.device
    )
    n = sizes["prompts"] * sizes["group"]
    config = GRPOConfig(
        run_dir=str(Path(args.tmp) / "ours-run"),
        device=args.device,
        max_steps=10_000,
        prompts_per_step=sizes["prompts"],
        group_size=sizes["group"],
        max_new_tokens=sizes["tokens"],
        min_new_tokens=sizes["tokens"],
        temperature=1.0,
        learning_rate=1e-5,
        mu=mu,
        micro_batch_size=n,
        beta=beta,
        lora=lora,
        rollouts_to_log=0,
        autocast="bfloat16" if args.dtype == "bfloat16" and not args.gpu else "off",
        generation_groups=sizes["prompts"],
        compile_decode=args.compile_decode,
    )
    examples = [{"id": str(i), "prompt": p} for i, p in enumerate(make_prompts(64))]
    trainer = GRPOTrainer(config, model, tokenizer, examples, Rubric({"digits": digit_reward}), app="bench")
    reference = trainer.reference
    separate = reference is not None and not reference.shares_policy
    counter = PassCounter([model, reference.model if separate else None])
    _setup_done()
    while True:
        if sys.stdin.readline().strip() in ("quit", ""):
            _finish()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()  # the whole step, logging included, as TRL's is timed between callbacks
        metrics = trainer.train_step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = metrics["completion_length"] * n
        _send(
            event="step",
            time=elapsed,
            generate_time=metrics["generate_time"],
            tokens=tokens,
            passes=counter.take(),
        )


def trl_worker(args, sizes: dict, beta: float, mu: int, lora: bool) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n = sizes["prompts"] * sizes["group"]
    bf16 = args.gpu or args.dtype == "bfloat16"
    config = GRPOConfig(
        output_dir=str(Path(args.tmp) / "trl-run"),
        use_cpu=args.device == "cpu",
        bf16=bf16,
        report_to="none",
        save_strategy="no",
        logging_steps=1_000_000,
        max_steps=10_000,
        seed=0,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=sizes["group"],
        max_completion_length=sizes["tokens"],
        generation_kwargs={"min_new_tokens": sizes["tokens"]},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-5,
        optim="adamw_torch",  # torch.optim.AdamW, as ours (transformers' default is the fused variant)
        beta=beta,
        num_iterations=mu,
        loss_type="grpo",
        gradient_checkpointing=args.trl_checkpointing,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if args.gpu else torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if lora
        else None
    )
    dataset = Dataset.from_list([{"prompt": p} for p in make_prompts(64)] * 200)
    state = {}

    class Driver(TrainerCallback):
        """Blocks before every mu-th trainer step until the driver asks for a GRPO step, then reports it."""

        def on_step_begin(self, targs, tstate, control, **kwargs):
            if tstate.global_step % mu == 0:
                if "ready" not in state:
                    state["ready"] = True
                    _setup_done()
                if sys.stdin.readline().strip() in ("quit", ""):
                    _finish()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                state["start"] = time.perf_counter()

        def on_step_end(self, targs, tstate, control, **kwargs):
            if tstate.global_step % mu == 0:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                _send(
                    event="step",
                    time=time.perf_counter() - state["start"],
                    tokens=state.pop("tokens"),  # of the generation this GRPO step trained on
                    passes=state["counter"].take(),
                )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [digit_reward(c) for c in completions]],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Driver()],
    )
    state["counter"] = PassCounter([trainer.model, getattr(trainer, "ref_model", None)])
    generate_and_score = trainer._generate_and_score_completions

    def counted(*args, **kwargs):  # the completion tokens TRL generated, from its own mask
        out = generate_and_score(*args, **kwargs)
        state["tokens"] = int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = counted
    trainer.train()


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, side: str, setting: str, args, model_dir: Path, tmp: Path):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--settings",
            setting,
            "--model-dir",
            str(model_dir),
        ]
        cmd += ["--tmp", str(tmp / side), "--device", args.device, "--dtype", args.dtype]
        cmd += (
            ["--smoke"] * args.smoke
            + ["--gpu"] * args.gpu
            + ["--trl-checkpointing"] * args.trl_checkpointing
            + ["--compile-decode"] * args.compile_decode
        )
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.side = side
        stderr = None if args.verbose else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        self.ready = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            sys.stdout.write(line)
        raise RuntimeError(f"the {self.side} worker ended without answering (rerun with --verbose)")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def run_setting(setting: str, args, model_dir: Path, tmp: Path, sizes: dict) -> dict:
    workers = {side: Worker(side, setting, args, model_dir, tmp) for side in ("ours", "trl")}
    steps = {side: [] for side in workers}
    for i in range(args.warmup + args.steps):
        for side in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):  # A B B A: no side always first
            answer = workers[side].ask("step")
            if i >= args.warmup:
                steps[side].append(answer)
    out = {}
    for side, worker in workers.items():
        done = worker.ask("quit")
        worker.proc.wait()
        times = [s["time"] for s in steps[side]]
        out[side] = {
            "median_s": statistics.median(times),
            "times": times,
            "tokens_per_s": statistics.median(s["tokens"] / s["time"] for s in steps[side]),
            "peak_rss_mib": done["peak_rss_kib"] / 1024,
            "peak_cuda_mib": done["peak_cuda_mib"],
            "step_growth_mib": done["step_growth_kib"] / 1024,
            "passes": steps[side][-1]["passes"],
        }
        if side == "ours":
            gen = statistics.median(s["generate_time"] for s in steps[side])
            out[side]["generate_s"] = gen
            out[side]["train_s"] = statistics.median(s["time"] - s["generate_time"] for s in steps[side])
    return out


def training_flops(sizes: dict, mu: int, beta: float, prompt_tokens: float, lora: bool = False) -> float:
    """Matmul FLOPs of our training phase per step (Kaplan et al. 2020, C = 6N). A forward costs, per
    position, 2 x (the decoder's weights + the attention scores' 2 L (P + T) h, QK^T and AV, not halved for
    causality), and the LM head's 2 h V per completion position only (prompt positions never reach the head
    in our passes). A trained pass adds its backward: twice the forward for every matmul, except that with
    LoRA the frozen weights take no weight gradient (once); attention has no weights (always twice; the
    adapters' own FLOPs are negligible). mu trained passes, a reference forward when beta > 0, no
    old-logprob pass (the first epoch's are kept); each group's prompt runs once."""
    h, layers, inter, vocab = sizes["hidden"], sizes["layers"], sizes["intermediate"], sizes["vocab"]
    kv = h * sizes["kv_heads"] // sizes["heads"]
    decoder = layers * (h * h * 2 + 2 * h * kv + 3 * h * inter)
    attention = 2 * layers * (prompt_tokens + sizes["tokens"]) * h
    positions = sizes["prompts"] * (prompt_tokens + sizes["group"] * sizes["tokens"])
    completions = sizes["prompts"] * sizes["group"] * sizes["tokens"]

    def one_pass(weights: int, scores: int) -> float:  # multiples of a forward's weight and score FLOPs
        return (
            2 * (weights * decoder + scores * attention) * positions + 2 * weights * h * vocab * completions
        )

    trained = one_pass(2 if lora else 3, 3)
    return mu * trained + (one_pass(1, 1) if beta > 0 else 0)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, e.g. beta0-mu1-lora0"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side and setting")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="see the docstring"
    )
    parser.add_argument("--trl-checkpointing", action="store_true", help="keep TRL's gradient checkpointing")
    parser.add_argument("--compile-decode", action="store_true", help="torch.compile our decode step")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker; 0 = torch's default"
    )
    parser.add_argument("--smoke", action="store_true", help="1 setting, 1 step, tiny sizes (CI)")
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B shape, 512 tokens, bf16, on cuda")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else GPU if args.gpu else CPU
    if args.gpu:
        args.device = "cuda"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        beta, mu, lora = parse_setting(args.settings)
        (ours_worker if args.worker == "ours" else trl_worker)(args, sizes, beta, mu, lora)
        return 0

    if args.smoke:
        args.settings, args.steps, args.warmup = "beta0.04-mu2-lora0", 1, 0
    settings = args.settings.split(",")
    for setting in settings:
        parse_setting(setting)
    import torch
    import transformers
    import trl

    print(
        f"GRPO step, ours vs TRL {trl.__version__} (transformers {transformers.__version__}, torch "
        f"{torch.__version__}), {args.device}, {args.dtype if not args.gpu else 'bfloat16 weights'}, "
        f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: Qwen2 hidden {sizes['hidden']} x {sizes['layers']} layers, random weights; "
        f"{sizes['prompts']} prompts x G={sizes['group']} x {sizes['tokens']} forced tokens per step; "
        f"{args.warmup} warm-up + {args.steps} measured steps per side, alternating"
    )
    print(
        "ours: one batched generate call (per-group seeded sampling), no gradient checkpointing"
        + (", bf16 autocast" if args.dtype == "bfloat16" else "")
        + (", decode step through torch.compile" if args.compile_decode else "")
    )
    print(
        "TRL:  GRPOTrainer(num_iterations=mu, loss_type='grpo'), HF generate, gradient checkpointing "
        + ("on" if args.trl_checkpointing else "off")
        + (", bf16=True" if args.dtype == "bfloat16" or args.gpu else ", bf16=False")
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_model_dir(tmp / "model", sizes)
        prompts = AutoTokenizer.from_pretrained(model_dir)(make_prompts(64), add_special_tokens=False)
        prompt_tokens = statistics.fmean(map(len, prompts["input_ids"]))  # for the MFU line
        header = (
            f"{'setting':<20} {'side':<5} {'step s':>7} {'gen s':>6} {'tok/s':>7} {'peak MiB':>9} "
            + (f"{'GPU MiB':>8} " if args.gpu else "")
            + f"{'+steps MiB':>10}  work per step (positions with grad / without grad, decode calls)"
        )
        print(header)
        for setting in settings:
            res = run_setting(setting, args, model_dir, tmp / setting, sizes)
            results[setting] = res
            for side in ("ours", "trl"):
                r = res[side]
                p = r["passes"]
                gen = f"{r['generate_s']:>6.2f}" if "generate_s" in r else f"{'':>6}"
                print(
                    f"{setting:<20} {side:<5} {r['median_s']:>7.3f} {gen} {r['tokens_per_s']:>7.0f} "
                    f"{r['peak_rss_mib']:>9.0f} "
                    + (f"{r['peak_cuda_mib']:>8.0f} " if args.gpu else "")
                    + f"{r['step_growth_mib']:>10.0f}  "
                    f"{p['grad_positions']} / {p['nograd_positions']}, {p['decode']}"
                )
            ratio = res["ours"]["median_s"] / res["trl"]["median_s"]
            memory = "peak_cuda_mib" if args.gpu else "peak_rss_mib"
            mem = res["ours"][memory] / res["trl"][memory]
            res["ratio"] = ratio
            line = f"{setting:<20} ours/TRL step time {ratio:.2f} (target <= 0.5), peak memory {mem:.2f}"
            line += " (GPU)" if args.gpu else ""
            if args.gpu:
                beta, mu, lora = parse_setting(setting)
                flops = training_flops(sizes, mu, beta, prompt_tokens=prompt_tokens, lora=lora)
                peak = next((v for k, v in PEAK_FLOPS if k in torch.cuda.get_device_name()), None)
                if peak:
                    line += f", training-phase MFU {flops / res['ours']['train_s'] / peak:.1%}"
            print(line, flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
