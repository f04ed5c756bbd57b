"""Train and evaluate the multi-head DeBERTa reward model on rows of reward_models/pairs.py.

Loss per batch of rows (PAPERS.md sec. 8, our choice of the per-head part):
    Bradley-Terry on fairness   -logsigmoid(f(neutral) - f(biased)), mean over rows
  + head_loss_weight * BCE of every head's logit against its label, on all four responses of each row.
A plain torch loop (AdamW, linear decay from transformers): the model is a custom module with three
heads, which `transformers.Trainer` would only wrap. Offline default: a tiny DeBERTa from a config with a
sentencepiece tokenizer trained on the training split; `--model DIR` starts from a local deberta-v3-*.

    grpo-suite reward-model train --data data/debias --run-dir runs/rm
    grpo-suite reward-model train --data data/debias --run-dir runs/rm --resume   # after a kill
    grpo-suite reward-model eval --reward-model runs/rm/model --data data/debias
Checkpoints (every `--save-every` steps and the last one, the newest kept) go to <run-dir>/checkpoints/step-N through
core/runs.py: weights, optimizer, scheduler, RNG states and the rest of the epoch's batch order, so that
`--resume` ends with the weights of an uninterrupted training. The run directory is a core run
('reward_model' 'bradley_terry': config.json, status.json, metrics.jsonl), so a resume takes its settings
from config.json as every `train` command does; the checkpoint keeps them too, with the split digests
(`data_record`), and a resume must match both.
Evaluation: pairwise accuracy per category (fairness: neutral > biased; relevance: neutral > off_topic;
quality: clean source > garbled), and each head's calibration (ECE over 10 equal-width bins, Brier score),
on splits the model recorded as its training data's (`check_eval_data`).
Tests: `pytest tests/reward_models/`.
"""

import math
import random
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from core.atomic import write_json_atomic
from core.config import config_to_dict
from core.data import InputError
from core.rng_state import capture_rng_state, restore_rng_state
from core.runs import (
    RunDir,
    changed_settings,
    failure_recorded,
    load_checkpoint,
    refuse_another_kind_of_run,
    run_to_resume,
)
from reward_models.deberta import (
    HEADS,
    MIN_MAX_LENGTH,
    build_tiny_reward_model,
    check_deberta_encoder,
    from_pretrained_encoder,
    tiny_deberta_config,
)
from reward_models.pairs import RESPONSE_KINDS, data_record, differing_splits, labels, read_splits
from reward_models.score import RewardModelScorer, encode
from reward_models.tokenizer import SPECIAL, train_tokenizer

APP, ALGORITHM = "reward_model", "bradley_terry"  # the run's kind in its config.json
# fields a resume may change: where and how it runs, not what it computes
HOW_IT_RUNS = ("resume", "run_dir", "device", "save_every")
# fields that name a path: a resume compares them resolved, whatever their spelling (relative, absolute)
PATH_FIELDS = ("data", "model")
# sentencepiece's least vocabulary: the special tokens, the word-start piece and one character; a corpus
# needs one piece more per further character (`_check_vocab_size`)
MIN_VOCAB_SIZE = len(SPECIAL) + 2


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class RMTrainConfig:
    """`grpo-suite reward-model train`."""

    data: str = _help(
        "directory with train/validation/test(/heldout).jsonl rows (reward_models/pairs.py)", "data/debias"
    )
    model: str | None = _help(
        "local deberta-v2/v3 directory to start from; default: a tiny DeBERTa built here", None
    )
    run_dir: str = _help(
        "output directory; the model is saved to <run-dir>/model, metrics to eval.json", "runs/reward_model"
    )
    seed: int = _help("seed of initialisation and batch order", 0)
    device: str = _help("cpu or cuda", "cpu")
    epochs: float = _help("passes over the training rows", 2.0)
    batch_size: int = _help("rows per step (each gives 4 sequences)", 16)
    learning_rate: float = _help(
        "AdamW learning rate (high: the default model is trained from scratch)", 1e-3
    )
    warmup_ratio: float = _help("share of steps of linear warm-up", 0.05)
    head_loss_weight: float = _help("weight of the per-head BCE next to the fairness Bradley-Terry loss", 1.0)
    max_length: int = _help("token cap of prompt + response", 128)
    vocab_size: int = _help(
        "sentencepiece vocabulary (tiny default only; capped by what the corpus supports)", 2000
    )
    hidden_size: int = _help("tiny default: hidden size", 64)
    num_layers: int = _help("tiny default: encoder layers", 2)
    num_heads: int = _help("tiny default: attention heads", 2)
    max_train_rows: int = _help("use at most this many training rows; 0 = all", 0)
    save_every: int = _help(
        "checkpoint every N optimizer steps to <run-dir>/checkpoints (the newest kept); 0 = none", 50
    )
    resume: bool = _help(
        "continue from the newest checkpoint in --run-dir with the settings it was saved with (only "
        "--device and --save-every may change); without a checkpoint, start over",
        False,
    )

    def __post_init__(self):
        for name in ("batch_size", "max_length", "hidden_size", "num_layers", "num_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < MIN_MAX_LENGTH:  # score.encode: 3 special tokens, a prompt and a response token
            raise ValueError(
                f"max_length must be >= {MIN_MAX_LENGTH} ([CLS] prompt [SEP] response [SEP], a token of "
                f"each), got {self.max_length}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} ({len(SPECIAL)} special tokens, the word-start piece "
                f"and a character), got {self.vocab_size}"
            )
        for name in ("save_every", "max_train_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        for name in ("epochs", "learning_rate"):
            if not getattr(self, name) > 0:  # nan too
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model:  # checked before the data is read and anything is built
            if not (Path(self.model) / "config.json").is_file():
                raise ValueError(f"model: {self.model} is not a local model directory (no config.json)")
            check_deberta_encoder(self.model)


@dataclass
class RMEvalConfig:
    """`grpo-suite reward-model eval`."""

    reward_model: str = _help("reward model directory (from `reward-model train`)", "runs/reward_model/model")
    data: str = _help(
        "data directory with test.jsonl (and heldout.jsonl); its splits must be those the model recorded "
        "as its training data",
        "data/debias",
    )
    splits: tuple[str, ...] | None = _help(
        "splits to evaluate; default: test, and heldout when <data>/heldout.jsonl exists", None
    )
    out: str | None = _help("write the results as JSON here; default: print only", None)
    device: str = _help("cpu or cuda", "cpu")
    batch_size: int = _help("sequences per forward", 64)

    def __post_init__(self):
        # before the evaluation, not at the write after it
        if self.out is not None and Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a directory; expected a JSON file to write")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.splits is not None and not self.splits:
            raise ValueError("splits must name at least one split")


def flatten(rows: list[dict]) -> tuple[list[str], list[str], torch.Tensor]:
    """Prompts, responses and (4R, K) targets: the four responses of each row, in RESPONSE_KINDS order."""
    prompts, responses, targets = [], [], []
    for row in rows:
        for kind in RESPONSE_KINDS:
            prompts.append(row["prompt"])
            responses.append(row[kind])
            label = labels(row, kind)
            targets.append([label[h] for h in HEADS])
    return prompts, responses, torch.tensor(targets)  # (4R, K)


def rm_loss(
    logits: torch.Tensor, targets: torch.Tensor, head_loss_weight: float
) -> tuple[torch.Tensor, dict]:
    """`logits`, `targets`: (4R, K) in flatten's order, column 0 fairness. Returns (loss, metrics)."""
    per_row = logits.view(-1, len(RESPONSE_KINDS), logits.shape[-1])  # (R, 4, K)
    margin = per_row[:, 0, 0] - per_row[:, 1, 0]  # (R,) fairness of neutral minus biased
    bt = -F.logsigmoid(margin).mean()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    loss = bt + head_loss_weight * bce
    return loss, {"bt": bt.item(), "bce": bce.item(), "pair_acc": (margin > 0).float().mean().item()}


def train_reward_model(config: RMTrainConfig) -> dict:
    """Train, save to <run_dir>/model, evaluate on validation/test/heldout; returns the eval results.
    With `config.resume`, continue from the newest checkpoint in <run_dir>."""
    # the data first: a bad --data stops the command before the run directory is made
    splits = read_splits(
        config.data,
        [
            name
            for name in ("train", "validation", "test", "heldout")
            if name in ("train", "validation") or (Path(config.data) / f"{name}.jsonl").is_file()
        ],
    )
    if not config.model:  # the tiny default's tokenizer is trained after the run directory is made
        _check_vocab_size(config, _tokenizer_corpus(_train_rows(config, splits)))
    run_dir = Path(config.run_dir)
    out = run_dir / "model"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    checkpoint_path = run.latest_checkpoint()
    if not config.resume:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; pick a new --run-dir")
        if checkpoint_path is not None:
            raise FileExistsError(
                f"{run_dir} holds checkpoints of an unfinished training; pass --resume to continue it or "
                "pick a new --run-dir"
            )
    elif checkpoint_path is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} holds the model of a finished training and {run_dir} no checkpoint to resume from "
            "(--save-every 0); evaluate it with `reward-model eval`, or pick a new --run-dir"
        )
    if config.resume and (run_dir / "config.json").is_file():
        refuse_another_kind_of_run(run_dir, run.read_config(), APP, ALGORITHM)
        run_to_resume(run_dir, "reward-model training")  # refused while another process runs it
    checkpoint = load_checkpoint(checkpoint_path) if config.resume and checkpoint_path else None
    record = data_record(config.data, splits)
    if checkpoint is not None:
        _check_same_settings(checkpoint.trainer_state["config"], config_to_dict(config), checkpoint.path)
        _check_same_data(checkpoint.trainer_state.get("training_data"), record, checkpoint.path, config.data)
    run = RunDir.create(
        run_dir,
        _resolved_paths(config_to_dict(config)),
        app=APP,
        algorithm=ALGORITHM,
        exist_ok_for_resume=config.resume,
    )
    run.set_status("running", step=checkpoint.step if checkpoint else 0)
    with failure_recorded(run, lambda: run.read_status()["step"]):
        results = _train_and_evaluate(config, splits, run, checkpoint, record)
    run.set_status("finished", step=results["steps"])
    return results


def _train_and_evaluate(
    config: RMTrainConfig, splits: dict[str, list[dict]], run: RunDir, checkpoint, record: dict
) -> dict:
    """The training loop from `checkpoint` (None: the start), then the save and the evaluation."""
    run_dir, out = run.path, run.path / "model"
    train_rows = _train_rows(config, splits)
    if config.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        model = from_pretrained_encoder(config.model, seed=config.seed)
    else:
        tokenizer = train_tokenizer(_tokenizer_corpus(train_rows), run_dir / "tokenizer", config.vocab_size)
        deberta = tiny_deberta_config(
            len(tokenizer),
            tokenizer.pad_token_id,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=4 * config.hidden_size,
            max_position_embeddings=config.max_length,
        )
        model = build_tiny_reward_model(deberta, seed=config.seed)
    model.to(config.device).train()

    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = get_scheduler("linear", optimizer, round(config.warmup_ratio * total), total)
    rng = random.Random(config.seed)
    order: list[int] = []
    done, earlier_seconds = 0, 0.0
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dropout
        if checkpoint is not None:
            model.load_state_dict(checkpoint.model_state)
            optimizer.load_state_dict(checkpoint.optimizer_state)
            scheduler.load_state_dict(checkpoint.scheduler_state)
            restore_rng_state(checkpoint.rng_state, {"order": rng})
            order, done = checkpoint.trainer_state["order"], checkpoint.step
            earlier_seconds = checkpoint.trainer_state.get("train_seconds", 0.0)  # the attempts before this
            print(f"resuming from {checkpoint.path}", flush=True)
        run.truncate_logs_after(done)  # a fresh start or a resume logs exactly what one whole training would
        history = run.read_metrics()
        for step in range(done + 1, total + 1):
            if len(order) < config.batch_size:
                epoch = list(range(len(train_rows)))
                rng.shuffle(epoch)
                order += epoch
            batch = [train_rows[i] for i in order[: config.batch_size]]
            del order[: config.batch_size]
            prompts, responses, targets = flatten(batch)
            enc = encode(tokenizer, prompts, responses, config.max_length, config.device)
            loss, metrics = rm_loss(model(**enc), targets.to(config.device), config.head_loss_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"loss": loss.item(), **metrics}
            history.append({"step": step, **row})
            run.log_metrics(step, row)
            if config.save_every and (step % config.save_every == 0 or step == total):  # the last: a resume
                # of a finished training checks its settings and evaluates again
                run.save_checkpoint(
                    step,
                    model_state=model.state_dict(),
                    optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(),
                    trainer_state={
                        "config": _resolved_paths(config_to_dict(config)),
                        "training_data": record,
                        "order": order,
                        "train_seconds": earlier_seconds + time.perf_counter() - start,
                    },
                    rng_state=capture_rng_state({"order": rng}),
                    keep_last=1,  # saves are atomic: the newest is always whole
                )
                run.set_status("running", step=step)
            if step % 25 == 0 or step == total:
                recent = history[-25:]
                mean = {k: sum(h[k] for h in recent) / len(recent) for k in ("loss", "pair_acc")}
                print(
                    f"step {step:>5}/{total}  loss {mean['loss']:.4f}  pair acc {mean['pair_acc']:.3f}"
                    f"  {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
    model.eval()
    model.save(out, tokenizer, max_length=config.max_length, training_data=record)
    scorer = RewardModelScorer(out, device=config.device)
    results = {  # the same whether the training was resumed or not: paths resolved, `resume` left out
        "config": {k: v for k, v in _resolved_paths(config_to_dict(config)).items() if k != "resume"},
        "train_seconds": earlier_seconds + time.perf_counter() - start,  # summed over the attempts
        "steps": total,
        "final_train_loss": history[-1]["loss"],
        **{name: evaluate_rows(scorer, rows) for name, rows in splits.items() if name != "train"},
    }
    write_json_atomic(run_dir / "eval.json", results)
    print(summary(results))
    print(f"reward model saved to {out}")
    return results


def _train_rows(config: RMTrainConfig, splits: dict[str, list[dict]]) -> list[dict]:
    return splits["train"][: config.max_train_rows or None]  # 0: all


def _tokenizer_corpus(rows: list[dict]) -> list[str]:
    """The texts the tiny default's tokenizer is trained on."""
    return [row[k] for row in rows for k in ("prompt", *RESPONSE_KINDS)]


def _check_vocab_size(config: RMTrainConfig, corpus: list[str]) -> None:
    """Refuse a --vocab-size below what sentencepiece needs for `corpus` (with character coverage 1): a
    piece per character (after its NFKC normalisation; whitespace is the word-start piece, control
    characters are dropped), the word-start piece and the special tokens."""
    chars = {
        c
        for text in corpus
        for c in unicodedata.normalize("NFKC", text)
        if c.isprintable() and not c.isspace()
    }
    needed = len(chars) + 1 + len(SPECIAL)
    if config.vocab_size < needed:
        raise InputError(
            f"vocab_size: {config.vocab_size} is too small for the training rows of --data {config.data}: "
            f"their {len(chars)} distinct characters, the word-start piece and {len(SPECIAL)} special "
            f"tokens need >= {needed}"
        )


def _resolved_paths(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with its PATH_FIELDS made absolute: one path spelled two ways compares equal."""
    return {k: str(Path(v).resolve()) if k in PATH_FIELDS and v is not None else v for k, v in config.items()}


def _check_same_settings(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resume continues the checkpoint's training: refuse settings other than those it was saved with."""
    changed = changed_settings(_resolved_paths(saved), _resolved_paths(current), HOW_IT_RUNS)
    if changed:
        raise InputError(
            f"{where}: saved with other settings ({'; '.join(changed)}); leave them out to resume with "
            "those of the run's config.json, or pick a new --run-dir"
        )


def _check_same_data(saved: dict | None, current: dict, where: Path, data: str) -> None:
    """A checkpoint keeps its batch order as row indices: refuse a resume on splits other than its own
    (`data_record`s of the checkpoint and of --data). One saved before the record was kept is not checked
    (a note says so)."""
    if saved is None:
        print(f"note: {where} has no record of its training data; not checked against --data {data}")
        return
    names = sorted(saved["splits"].keys() | current["splits"].keys())
    differ = [
        n
        for n in names
        if saved["splits"].get(n, {}).get("sha256") != current["splits"].get(n, {}).get("sha256")
    ]
    if differ:
        raise InputError(
            f"{where}: saved while training on {saved['data_dir']}, whose {', '.join(differ)} rows differ "
            f"from those of --data {data} now; resume on the data it was saved with, or pick a new --run-dir"
        )


def check_eval_data(reward_model: str, record: dict | None, splits: dict[str, list[dict]], data: str) -> None:
    """Refuse `splits` (from `data`) other than those the reward model recorded as its training data
    (`data_record`, saved with it): its training rows could be among them. A model saved before the record
    was kept is not checked (a note says so)."""
    if record is None:
        print(f"note: {reward_model} has no record of its training data; not checked against these splits")
        return
    unrecorded = sorted(set(splits) - set(record["splits"]))
    if unrecorded:  # trained without it: rows of another directory under that name may be its training rows
        raise InputError(
            f"{reward_model}: trained on {record['data_dir']}, which had no {', '.join(unrecorded)} split: "
            f"the {', '.join(unrecorded)} rows of --data {data} cannot be checked against its training rows"
        )
    differ = differing_splits(record, splits)
    if differ:
        heldout = ", ".join(record["splits"].get("heldout", {}).get("categories", [])) or "none"
        raise InputError(
            f"{reward_model}: trained on {record['data_dir']} (held-out: {heldout}), but the "
            f"{', '.join(differ)} rows of --data {data} are not those it recorded (it may have trained on "
            f"them); pass --data {record['data_dir']}"
        )


def calibration(probs: torch.Tensor, targets: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """ECE (equal-width bins, weighted by count) and Brier score of probabilities (N,) against 0/1 labels.

    >>> {k: round(v, 6) for k, v in calibration(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])).items()}
    {'ece': 0.1, 'brier': 0.01}
    """
    index = (probs * bins).long().clamp(max=bins - 1)  # (N,)
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece += float(in_bin.float().mean() * (probs[in_bin].mean() - targets[in_bin].mean()).abs())
    return {"ece": ece, "brier": float(((probs - targets) ** 2).mean())}


def evaluate_rows(scorer: RewardModelScorer, rows: list[dict]) -> dict:
    """Pairwise accuracies overall and per category, head means per response kind, and calibration."""
    prompts, responses, targets = flatten(rows)
    scores = scorer.score(prompts, responses)
    probs = torch.tensor([scores[h] for h in HEADS]).T.view(
        len(rows), len(RESPONSE_KINDS), len(HEADS)
    )  # (R, 4, K)
    clean = torch.tensor([RESPONSE_KINDS.index(r["garbled_source"]) for r in rows])  # (R,)
    wins = {
        "fairness": probs[:, 0, 0] > probs[:, 1, 0],  # neutral over biased
        "relevance": probs[:, 0, 1] > probs[:, 2, 1],  # neutral over off-topic
        "quality": probs[torch.arange(len(rows)), clean, 2] > probs[:, 3, 2],  # clean source over garbled
    }  # each (R,) bool
    categories = sorted({r["category"] for r in rows})
    per_category = {}
    for category in categories:
        mask = torch.tensor([r["category"] == category for r in rows])
        per_category[category] = {
            "n": int(mask.sum()),
            **{f"pair_acc/{h}": float(w[mask].float().mean()) for h, w in wins.items()},
        }
    flat_targets = targets.view(len(rows), len(RESPONSE_KINDS), len(HEADS))
    return {
        "n": len(rows),
        **{f"pair_acc/{h}": float(w.float().mean()) for h, w in wins.items()},
        "per_category": per_category,
        "mean_score": {
            kind: {h: float(probs[:, i, k].mean()) for k, h in enumerate(HEADS)}
            for i, kind in enumerate(RESPONSE_KINDS)
        },
        "calibration": {
            h: calibration(probs[..., k].flatten(), flat_targets[..., k].flatten())
            for k, h in enumerate(HEADS)
        },
    }


def summary(results: dict) -> str:
    lines = [f"{'split':<11}{'n':>5} {'fair acc':>9} {'relev acc':>9} {'qual acc':>9} {'fair ECE':>9}"]
    for name, r in results.items():
        if isinstance(r, dict) and "pair_acc/fairness" in r:
            lines.append(
                f"{name:<11}{r['n']:>5} {r['pair_acc/fairness']:>9.3f} {r['pair_acc/relevance']:>9.3f} "
                f"{r['pair_acc/quality']:>9.3f} {r['calibration']['fairness']['ece']:>9.3f}"
            )
    return "\n".join(lines)


def evaluate_reward_model(config: RMEvalConfig) -> dict:
    """Pairwise accuracy and calibration per split, on splits the model recorded (`check_eval_data`)."""
    names = config.splits or (
        "test",
        *(("heldout",) if (Path(config.data) / "heldout.jsonl").is_file() else ()),
    )
    splits = read_splits(config.data, names)
    scorer = RewardModelScorer(config.reward_model, device=config.device, batch_size=config.batch_size)
    check_eval_data(config.reward_model, scorer.training_data, splits, config.data)
    results = {name: evaluate_rows(scorer, rows) for name, rows in splits.items()}
    print(summary(results))
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(config.out), results)
        print(f"written to {config.out}")
    return results
