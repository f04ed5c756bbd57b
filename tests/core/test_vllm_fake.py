"""core/vllm_backend.py on CPU, against a fake `vllm` module: the same Rollouts layout as the HF backend
(eos, length, stop strings, sampling log-probs per token), per-row seeds, `generate_groups`, the
trainer's tokenizer, and weight updates. The real engine is tested in tests/core/test_rollout.py (gpu).

The fake engine samples row tokens from `random.Random(seed)` over the request's own prompt ids, so a
row's completion depends on its seed and prompt only, and reports log-prob -(k + 1) / 10 at position k.
"""

import json
import os
import random
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from core.multi_turn import multi_turn_rollouts
from core.policy import load_policy
from core.rollout import SamplingSettings, derive_seed
from core.vllm_backend import VLLMBackend

TEXTS = ["hello world = 1+2", "what is 7?", "stop here"]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    eos_token_id: int  # set by the fixture: the tokenizer's eos

    def __init__(self, **kwargs):
        self.kwargs, self.params, self.calls = kwargs, [], []
        max_model_len = kwargs.get("max_model_len", 32768)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))

    def generate(self, requests, params, use_tqdm=True):
        self.params.append(params)
        outputs = []
        for request, p in zip(requests, params, strict=True):
            rng = random.Random(p.seed)
            pool = request["prompt_token_ids"] + [self.eos_token_id]
            tokens = []
            while len(tokens) < p.max_tokens and (not tokens or tokens[-1] != self.eos_token_id):
                tokens.append(rng.choice(pool))
            logprobs = None
            if p.logprobs is not None:
                logprobs = [{t: SimpleNamespace(logprob=-(k + 1) / 10)} for k, t in enumerate(tokens)]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs)]))
        return outputs

    def collective_rpc(self, fn, args=()):
        loaded = []
        load_weights = SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
        fn(SimpleNamespace(model_runner=SimpleNamespace(model=load_weights)), *args)
        self.calls.append(("load_weights", dict(loaded)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def save_model_dir(path, *, pad: bool):
    """A tiny random qwen2 with a character-level tokenizer of the generic class (PreTrainedTokenizerFast),
    with or without a pad token."""
    vocab = {
        "<pad>": 0,
        "<eos>": 1,
        "<unk>": 2,
        **{c: i + 3 for i, c in enumerate(sorted(set("".join(TEXTS))))},
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    special = {"eos_token": "<eos>", "unk_token": "<unk>", **({"pad_token": "<pad>"} if pad else {})}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("vllm") / "tiny", pad=True)


def install_fake_vllm(monkeypatch, eos_token_id: int) -> None:
    fake = ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(FakeLLM, "eos_token_id", eos_token_id, raising=False)


@pytest.fixture
def backend(model_dir, monkeypatch):
    install_fake_vllm(monkeypatch, eos_token_id=1)
    return VLLMBackend(str(model_dir))


def test_the_tokenizer_is_the_trainers(backend, model_dir):
    """Loaded as load_policy does: a bare AutoTokenizer rebuilt it as Qwen2Tokenizer, which drops spaces."""
    _, tokenizer = load_policy(model_dir)
    assert type(backend.tokenizer) is type(tokenizer)
    text = "hello world = 1+2"
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert backend.tokenizer.decode(ids) == text
    assert backend.tokenizer.padding_side == "left"


def test_a_tokenizer_without_pad_pads_with_eos_as_the_trainers(tmp_path, monkeypatch):
    path = save_model_dir(tmp_path / "nopad", pad=False)
    install_fake_vllm(monkeypatch, eos_token_id=1)
    assert VLLMBackend(str(path)).tokenizer.pad_token == load_policy(path)[1].pad_token == "<eos>"


def test_rollouts_have_the_hf_layout(backend):
    tok = backend.tokenizer
    settings = SamplingSettings(max_new_tokens=6, temperature=0.7)
    out = backend.generate(TEXTS, settings, seed=5)
    assert out.prompts == TEXTS
    seeds = [p.seed for p in backend.llm.params[-1]]
    assert seeds == [derive_seed(5, i) for i in range(len(TEXTS))]
    for i, p in enumerate(backend.llm.params[-1]):
        assert (p.n, p.temperature, p.max_tokens, p.logprobs, p.top_k) == (1, 0.7, 6, 0, -1)
        prompt = tok(TEXTS[i], add_special_tokens=False)["input_ids"]
        expected = FakeLLM.generate(backend.llm, [{"prompt_token_ids": prompt}], [p])[0].outputs[0].token_ids
        n = int(out.completion_mask[i].sum())
        assert out.completion_ids[i, :n].tolist() == expected
        assert out.finish_reason[i] == ("stop" if expected[-1] == tok.eos_token_id else "length")
        assert out.sampling_logp[i, :n].tolist() == pytest.approx([-(k + 1) / 10 for k in range(n)])
        assert not out.completion_mask[i, n:].any()


def test_stop_strings_are_cut_with_the_trainers_tokenizer(backend):
    tok = backend.tokenizer
    out = backend.generate(["stop here"], SamplingSettings(max_new_tokens=40, stop_strings=("p",)), seed=0)
    (text,) = out.completions
    n = int(out.completion_mask[0].sum())
    assert text.endswith("p") and "p" not in text[:-1]
    assert tok.decode(out.completion_ids[0, :n]) == text


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(max_new_tokens=4, top_k=3),
        SamplingSettings(max_new_tokens=4, top_p=0.9),
        SamplingSettings(max_new_tokens=4, min_new_tokens=2),
        SamplingSettings(max_new_tokens=4, greedy=True, temperature=0.5),
    ],
)
def test_sampling_logp_is_none_where_vllm_reports_another_distribution(backend, settings):
    assert backend.generate(TEXTS[:1], settings, seed=0).sampling_logp is None
    assert backend.llm.params[-1][0].logprobs is None


def test_generate_groups_gives_each_group_what_generate_gives_it_alone(backend):
    settings, group_size, seeds = SamplingSettings(max_new_tokens=8), 3, [11, 22]
    prompts = [TEXTS[0]] * group_size + [TEXTS[1]] * group_size
    together = backend.generate_groups(prompts, settings, seeds, group_size)
    assert len(backend.llm.params[-1]) == 6  # one engine call for both groups
    for g, seed in enumerate(seeds):
        alone = backend.generate([TEXTS[g]] * group_size, settings, seed)
        rows = slice(g * group_size, (g + 1) * group_size)
        assert together.completions[rows] == alone.completions
        assert torch.equal(together.completion_mask[rows], alone.completion_mask)
    assert together.prompts == prompts
    with pytest.raises(ValueError, match="5 prompts for 2 seeds x group_size 3"):
        backend.generate_groups(prompts[:5], settings, seeds, group_size)


def test_update_weights_sends_every_weight_then_drops_the_prefix_cache(backend, model_dir):
    model, _ = load_policy(model_dir)
    backend.update_weights(model)
    (load, weights), reset = backend.llm.calls
    assert load == "load_weights" and weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert reset == ("reset_prefix_cache",)


class EchoEnv:
    """Appends "=1" after every turn and never ends the episode."""

    def reset(self, prompt: str, example: dict) -> None:
        return None

    def step(self, state: None, turn_text: str) -> tuple[str, bool]:
        return "=1", False


def test_multi_turn_episodes_end_at_the_engines_max_model_len(model_dir, monkeypatch):
    """The context limit was read from `backend.model`, which VLLMBackend has not: episodes grew past vLLM's
    max_model_len (which may be below the model's max_position_embeddings) until the engine refused one."""
    install_fake_vllm(monkeypatch, eos_token_id=1)
    lengths = []

    def full_turns(self, requests, params, use_tqdm=True):  # every turn runs to max_tokens, no eos
        lengths.extend(len(r["prompt_token_ids"]) for r in requests)
        tokens = [[r["prompt_token_ids"][0]] * p.max_tokens for r, p in zip(requests, params, strict=True)]
        logprobs = [[{t: SimpleNamespace(logprob=-0.5)} for t in row] for row in tokens]
        return [
            SimpleNamespace(outputs=[SimpleNamespace(token_ids=row, logprobs=lp)])
            for row, lp in zip(tokens, logprobs, strict=True)
        ]

    monkeypatch.setattr(FakeLLM, "generate", full_turns)
    backend = VLLMBackend(str(model_dir), max_model_len=24)
    assert backend.max_context == 24
    settings = SamplingSettings(max_new_tokens=6)
    rollouts = multi_turn_rollouts(
        backend, ["what is 7?"], [{"id": 0}], EchoEnv(), settings, seed=0, max_turns=9
    )
    # "what is 7?" is 10 tokens; turn 1 ends at 16 and its "=1" at 18; turn 2 ends at 24, where its
    # observation no longer fits: turn 3 is not played
    assert lengths == [10, 18]
    assert rollouts.num_turns == [2] and rollouts.finish_reason == ["context"]
    assert rollouts.prompt_ids.shape[1] + rollouts.completion_ids.shape[1] == 24


def test_a_temperature_vllm_would_decode_greedily_is_refused(backend):
    """Below 1e-5 vLLM decodes greedily: the log-probs it reports are not those of the sampling."""
    with pytest.raises(ValueError, match="temperature 1e-06 is below 1e-05, where vLLM decodes greedily"):
        backend.generate(TEXTS, SamplingSettings(max_new_tokens=2, temperature=1e-6), seed=0)
    backend.generate(TEXTS, SamplingSettings(max_new_tokens=2, temperature=1e-5), seed=0)


def test_sampling_settings_and_engine_options_reach_vllm(backend):
    """Each setting goes to vLLM's SamplingParams under its own name; greedy is vLLM's temperature 0 (a
    temperature below 1e-5 is then fine); the engine runs in process, with our log-prob mode and without
    the model's generation_config.json."""
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    kwargs = backend.llm.kwargs
    assert (kwargs["logprobs_mode"], kwargs["generation_config"], kwargs["seed"]) == (
        "processed_logprobs",
        "vllm",
        0,
    )
    settings = SamplingSettings(max_new_tokens=5, temperature=0.9, top_p=0.8, top_k=4, min_new_tokens=2)
    backend.generate(TEXTS[:1], settings, seed=0)
    (p,) = backend.llm.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens) == (0.9, 0.8, 4, 5, 2)
    assert p.stop is None
    greedy = SamplingSettings(max_new_tokens=3, greedy=True, temperature=1e-6, stop_strings=("p",))
    backend.generate(TEXTS[:1], greedy, seed=0)
    (p,) = backend.llm.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_tokens, p.stop) == (0.0, 1.0, -1, 0, ["p"])
    assert p.include_stop_str_in_output is True


def test_the_models_end_of_turn_ids_are_stop_tokens(tmp_path, monkeypatch):
    """The engine runs without generation_config.json: its eos ids (within the vocabulary) are passed as
    stop tokens and end a completion, as HFGenerateBackend ends it; without that file, config.json's."""
    path = save_model_dir(tmp_path / "tiny", pad=True)
    install_fake_vllm(monkeypatch, eos_token_id=1)
    end = 5  # an ordinary character of the vocabulary, made an end of turn
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [1, end, 10**6]}))
    backend = VLLMBackend(str(path))
    assert backend.eos_ids == (1, end)
    backend.generate(TEXTS[:1], SamplingSettings(max_new_tokens=5), seed=0)
    assert backend.llm.params[-1][0].stop_token_ids == [end]
    (path / "generation_config.json").unlink()
    model_config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(model_config | {"eos_token_id": end}))
    assert VLLMBackend(str(path)).eos_ids == (1, end)
