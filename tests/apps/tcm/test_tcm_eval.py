"""TCM evaluation on hand-written completions: per-type accuracy, format rate, ROUGE-L and BLEU."""

import math
import types

import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from apps.tcm.evaluate import (
    TcmEvalConfig,
    bleu,
    dashboard_keys,
    evaluate_model,
    format_table,
    score_completions,
)
from apps.tcm.rewards import rouge_l, zh_tokens
from core.data import InputError


def wrap(answer: str) -> str:
    return f"<think>\n想\n</think>\n<answer>\n{answer}\n</answer>"


EXAMPLES = [
    {"type": "single", "answer": "B"},
    {"type": "single", "answer": "A"},
    {"type": "multiple", "answer": "AC"},
    {"type": "fill", "question": "麻黄归____经。", "answer": "肺、膀胱"},
    {"type": "open", "answer": "发汗解表，宣肺平喘"},
    {"type": "open", "answer": "益气健脾"},
]


def test_per_type_table_by_hand():
    completions = [
        wrap("B"),  # right, formatted
        "答案是A",  # right, unformatted
        wrap("A、C"),  # right
        wrap("膀胱，肺"),  # right
        wrap("发汗解表，宣肺平喘"),  # exact
        wrap("补血调血"),  # wrong
    ]
    result = score_completions(completions, EXAMPLES)
    by_type = result["by_type"]
    assert by_type["single"] == {"n": 2, "accuracy": 1.0, "format_rate": 0.5, "tag_count": 0.5}
    assert by_type["multiple"]["accuracy"] == 1.0 and by_type["fill"]["accuracy"] == 1.0
    assert by_type["fill"]["rouge_l"] == pytest.approx(0.5)  # 膀胱/肺 vs 肺/膀胱: LCS 1 of 2 words
    assert by_type["open"]["accuracy"] == 0.5
    assert by_type["open"]["rouge_l"] == pytest.approx(0.5)  # one exact (1.0), one with no common word (0.0)
    assert result["overall"] == {
        "n": 6,
        "accuracy": pytest.approx(5 / 6),
        "format_rate": pytest.approx(5 / 6),
    }
    assert "single" in format_table({"before": result, "after": result})


def test_a_fill_answer_restating_the_question_is_scored_on_its_filled_blank():
    examples = [{"type": "fill", "question": "麻黄归____经。", "answer": "肺、膀胱"}] * 2
    completions = [
        "<think>\n麻黄归肺、膀胱经。\n</think>\n<answer>\n麻黄归肺、膀胱经。\n</answer>",
        "<think>\n麻黄归肺经。\n</think>\n<answer>\n麻黄归肺经。\n</answer>",
    ]
    fill = score_completions(completions, examples)["by_type"]["fill"]
    assert fill["accuracy"] == 0.5
    # jieba: 肺/膀胱 against 肺/膀胱 (F 1), 肺 against 肺/膀胱 (P 1, R 1/2: F 2/3); not the whole sentences
    assert fill["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)


def test_truncated_answers_are_scored_on_their_text():
    examples = [
        {"type": "fill", "question": "麻黄性____。", "answer": "温"},
        {"type": "open", "answer": "发汗解表，宣肺平喘"},
    ]
    completions = [
        "<think>\n想\n</think>\n<answer>\n温",
        "<think>\n想\n</think>\n<answer>\n发汗解表，宣肺平喘",
    ]
    by_type = score_completions(completions, examples)["by_type"]
    assert by_type["fill"]["accuracy"] == 1.0 and by_type["fill"]["format_rate"] == 0.0
    assert by_type["open"]["rouge_l"] == pytest.approx(1.0) and by_type["open"]["bleu"] == pytest.approx(1.0)


def test_bleu_on_chinese_words():
    assert bleu(["发汗解表，宣肺平喘，利水消肿"], ["发汗解表，宣肺平喘，利水消肿"]) == pytest.approx(1.0)
    assert bleu(["补血调血"], ["发汗解表，宣肺平喘"]) == pytest.approx(0.0, abs=1e-3)
    assert bleu([""], ["发汗解表"]) == 0.0
    # 4 words against 6, every n-gram precision 1: BLEU is the brevity penalty exp(1 - 6/4)
    assert bleu(["发汗解表，宣肺平喘"], ["发汗解表，宣肺平喘，利水消肿"]) == pytest.approx(math.exp(-0.5))


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="1 completions for 6 examples"):
        score_completions(["x"], EXAMPLES)


def test_dashboard_keys_per_type():
    answers = ["B", "C", "A、C", "肺", "发汗解表，宣肺平喘", "益气健脾"]
    completions = [wrap(answer) for answer in answers]
    keys = dashboard_keys(score_completions(completions, EXAMPLES))
    assert keys == {
        "accuracy_by_type": {"single": 0.5, "multiple": 1.0, "fill": 0.0, "open": 1.0},
        "count_by_type": {"single": 2, "multiple": 1, "fill": 1, "open": 2},
    }


def test_open_accuracy_is_exact_match_and_bleu_is_predictions_against_references():
    """A partial open answer: exact match 0 (not its ROUGE-L); BLEU scores the predictions against the
    references (swapped, the brevity penalty and the n-gram counts change)."""
    examples = [
        {"type": "open", "answer": "发汗解表，宣肺平喘"},
        {"type": "open", "answer": "发汗解表，宣肺平喘"},
        {"type": "open", "answer": "益气健脾"},
    ]
    predictions = ["发汗解表，宣肺平喘", "发汗解表", "补血调血"]  # exact, partial, wrong
    open_row = score_completions([wrap(p) for p in predictions], examples)["by_type"]["open"]
    assert open_row["accuracy"] == pytest.approx(1 / 3)  # ROUGE as accuracy would give 5/9
    # partial: words 发汗/解表 of 发汗/解表/宣肺/平喘: LCS 2, P 1, R 1/2, F1 2/3
    assert rouge_l("发汗解表", "发汗解表，宣肺平喘") == pytest.approx(2 / 3)
    assert open_row["rouge_l"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    references = [example["answer"] for example in examples]
    expected = corpus_bleu(
        [[zh_tokens(r)] for r in references],
        [zh_tokens(p) for p in predictions],
        smoothing_function=SmoothingFunction().method1,
    )
    assert open_row["bleu"] == pytest.approx(expected)
    # by hand (nltk counts at least 1 n-gram per sentence): hypothesis 8 words, references 10;
    # p1 = 6/8, p2 = 4/5, p3 = 2/(2+1+1), p4 = 1/(1+1+1)
    by_hand = math.exp(1 - 10 / 8) * (6 / 8 * 4 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert open_row["bleu"] == pytest.approx(by_hand)
    assert bleu(references, predictions) != pytest.approx(by_hand)  # the swap this guards against


def test_bleu_of_a_short_partial_answer_is_smoothed_not_zero():
    """3 words, all in the 4-word reference, and no 4-gram at all: unsmoothed BLEU-4 is 0; method 1 puts
    epsilon 0.1 in place of the empty 4-gram count."""
    prediction, reference = "发汗解表，宣肺", "发汗解表，宣肺平喘"
    assert zh_tokens(prediction) == ["发汗", "解表", "宣肺"]
    expected = corpus_bleu(
        [[zh_tokens(reference)]], [zh_tokens(prediction)], smoothing_function=SmoothingFunction().method1
    )
    score = bleu([prediction], [reference])
    assert score > 0.1
    assert score == pytest.approx(expected)
    # by hand: p1 = p2 = p3 = 1, p4 = 0.1 / 1, brevity penalty exp(1 - 4/3)
    assert score == pytest.approx(math.exp(1 - 4 / 3) * 0.1**0.25)


def test_format_table_cells_by_hand():
    """One result: each row's accuracy then its format rate, in their own columns."""
    row = {"n": 2, "accuracy": 0.5, "format_rate": 1.0}
    table = format_table({"after": {"by_type": {"single": row}, "overall": row | {"accuracy": 0.25}}})
    assert table.splitlines() == [
        f"{'type':<10}{'after acc':>13}{'after fmt':>13}",
        f"{'single':<10}{'0.500':>13}{'1.000':>13}",
        f"{'overall':<10}{'0.250':>13}{'1.000':>13}",
    ]


def test_eval_config_refuses_a_batch_size_below_one(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TcmEvalConfig(model=str(tmp_path / "m"), batch_size=0)


def test_evaluation_decodes_greedily(monkeypatch):
    """The evaluation's answers are the model's greedy ones (the paper's), not samples."""
    import apps.tcm.evaluate as tcm_evaluate

    seen = []

    class Backend:
        max_context = None

        def __init__(self, model, tokenizer, device, batch_size):
            pass

        def generate(self, prompts, settings, seed):
            seen.append(settings)
            return types.SimpleNamespace(completions=[wrap("B")] * len(prompts))

    monkeypatch.setattr(tcm_evaluate, "HFGenerateBackend", Backend)
    examples = [example | {"prompt": "p"} for example in EXAMPLES[:2]]
    metrics, _ = evaluate_model(None, None, examples, max_new_tokens=5, batch_size=2, device="cpu", seed=0)
    assert [(s.greedy, s.max_new_tokens) for s in seen] == [(True, 5)]
    assert metrics["by_type"]["single"]["accuracy"] == 0.5


def test_tag_count_is_the_mean_tag_reward_not_the_format_rate():
    """Tags on lines of their own but the answer not tagged: strict format 0, tag count 2 of 4 tags."""
    examples = [{"type": "single", "answer": "B"}, {"type": "single", "answer": "A"}]
    completions = [wrap("B"), "<think>\n想\n</think>\nA"]
    row = score_completions(completions, examples)["by_type"]["single"]
    assert row == {"n": 2, "accuracy": 1.0, "format_rate": 0.5, "tag_count": pytest.approx((1 + 0.5) / 2)}


def test_free_text_answers_are_scored_without_their_answer_cue():
    """答案：温 answers 温 (as the rewards read it): exact match, ROUGE-L 1 and BLEU 1 on the bare answer."""
    examples = [
        {"type": "fill", "question": "麻黄性____。", "answer": "温"},
        {"type": "open", "answer": "发汗解表，宣肺平喘"},
    ]
    completions = [wrap("答案：温"), wrap("答：发汗解表，宣肺平喘")]
    by_type = score_completions(completions, examples)["by_type"]
    assert by_type["fill"]["accuracy"] == 1.0 and by_type["fill"]["rouge_l"] == pytest.approx(1.0)
    assert by_type["open"]["accuracy"] == 1.0 and by_type["open"]["rouge_l"] == pytest.approx(1.0)
    assert by_type["open"]["bleu"] == pytest.approx(1.0)


def test_bleu_keeps_the_other_answers_when_one_is_empty():
    """An empty prediction among others is scored (no words, its reference's length); only all-empty
    predictions give 0."""
    predictions, references = ["发汗解表，宣肺平喘", ""], ["发汗解表，宣肺平喘", "益气健脾"]
    # by hand (nltk counts at least 1 n-gram per sentence): p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2;
    # 4 hypothesis words against 4 + 2 reference words: the brevity penalty exp(1 - 6/4)
    by_hand = math.exp(1 - 6 / 4) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(predictions, references) == pytest.approx(by_hand)
    assert bleu(["", ""], references) == 0.0


def test_format_table_gives_each_result_its_own_overall_row():
    """Two results side by side: each column of the overall row is that result's."""
    before_row, after_row = (
        {"n": 2, "accuracy": 0.5, "format_rate": 0.25},
        {"n": 2, "accuracy": 1.0, "format_rate": 0.75},
    )
    table = format_table(
        {
            "before": {"by_type": {"fill": before_row}, "overall": before_row | {"accuracy": 0.125}},
            "after": {"by_type": {"fill": after_row}, "overall": after_row | {"accuracy": 0.875}},
        }
    )
    assert table.splitlines()[1:] == [
        f"{'fill':<10}{'0.500':>13}{'0.250':>13}{'1.000':>13}{'0.750':>13}",
        f"{'overall':<10}{'0.125':>13}{'0.250':>13}{'0.875':>13}{'0.750':>13}",
    ]


def test_evaluation_passes_its_batch_size_and_seed_to_the_backend(monkeypatch):
    import apps.tcm.evaluate as tcm_evaluate

    seen = []

    class Backend:
        max_context = None

        def __init__(self, model, tokenizer, device, batch_size):
            seen.append(("batch_size", batch_size))

        def generate(self, prompts, settings, seed):
            seen.append(("seed", seed))
            return types.SimpleNamespace(completions=[wrap("B")] * len(prompts))

    monkeypatch.setattr(tcm_evaluate, "HFGenerateBackend", Backend)
    examples = [example | {"prompt": "p"} for example in EXAMPLES[:2]]
    evaluate_model(None, None, examples, max_new_tokens=5, batch_size=3, device="cpu", seed=7)
    assert seen == [("batch_size", 3), ("seed", 7)]


def test_evaluate_takes_unset_settings_from_a_tcm_run_only(tmp_path):
    """A model of another app's run (a toy run's 6 new tokens, seed 3) was scored with that run's settings."""
    from apps.tcm.evaluate import TcmEvalConfig
    from core.runs import RunDir

    for app in ("toy", "tcm"):
        settings = {"max_new_tokens": 6, "seed": 3}
        RunDir.create(tmp_path / app, settings, app=app, algorithm="grpo", exist_ok_for_resume=False)
    from_toy = TcmEvalConfig(model=str(tmp_path / "toy" / "final"))
    from_tcm = TcmEvalConfig(model=str(tmp_path / "tcm" / "final"))
    assert (from_toy.max_new_tokens, from_toy.seed) == (512, 0)  # the defaults
    assert (from_tcm.max_new_tokens, from_tcm.seed) == (6, 3)


def test_a_prompt_too_long_for_the_models_context_is_named_before_generating(monkeypatch):
    """Generation failed with an IndexError on it (tcm evaluate, and tcm train's evaluation before GRPO)."""
    import apps.tcm.evaluate as tcm_evaluate

    class Backend:
        max_context = 12

        def __init__(self, model, tokenizer, device, batch_size):
            pass

        def generate(self, prompts, settings, seed):
            raise AssertionError("generated")

    def characters(texts, add_special_tokens):  # one token per character
        return {"input_ids": [list(range(len(text))) for text in texts]}

    monkeypatch.setattr(tcm_evaluate, "HFGenerateBackend", Backend)
    examples = [EXAMPLES[0] | {"id": "q1", "prompt": "p"}, EXAMPLES[1] | {"id": "q2", "prompt": "p" * 8}]
    with pytest.raises(
        InputError,
        match="example 'q2': prompt of 8 tokens \\+ max_new_tokens 5 exceeds the model's context of 12",
    ):
        evaluate_model(None, characters, examples, max_new_tokens=5, batch_size=2, device="cpu", seed=0)


def test_no_examples_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="0 completions for 0 examples"):
        score_completions([], [])


def test_overall_format_rate_is_the_strict_format_rate_not_the_tag_count():
    """The overall format rate counts completions in the strict format (1 of 2), not the mean tag reward
    ((1 + 0.5) / 2): the second has its think tags but no answer tags."""
    examples = [
        {"type": "single", "answer": "B"},
        {"type": "fill", "question": "麻黄性____。", "answer": "温"},
    ]
    completions = [wrap("B"), "<think>\n想\n</think>\n寒"]
    assert score_completions(completions, examples)["overall"] == {
        "n": 2,
        "accuracy": 0.5,
        "format_rate": 0.5,
    }


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 1, got -5"),
        ({"max_examples": -1}, "max_examples must be >= 0, got -1"),
    ],
)
def test_eval_config_refuses_a_completion_cap_below_one_and_negative_max_examples(
    tmp_path, settings, message
):
    with pytest.raises(ValueError, match=message):
        TcmEvalConfig(model=str(tmp_path / "m"), **settings)


def test_evaluate_keeps_a_seed_of_0_given_for_a_run_trained_with_another(tmp_path):
    """Only unset settings come from the model's run: --seed 0 is a setting, not a missing one (the run's
    seed 3 would score the model on another split)."""
    from core.runs import RunDir

    settings = {"max_new_tokens": 6, "seed": 3, "system_prompt": "short"}
    RunDir.create(tmp_path / "tcm", settings, app="tcm", algorithm="grpo", exist_ok_for_resume=False)
    config = TcmEvalConfig(model=str(tmp_path / "tcm" / "final"), seed=0)
    assert (config.seed, config.max_new_tokens, config.system_prompt) == (0, 6, "short")
