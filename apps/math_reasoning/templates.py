"""Prompt templates and answer extraction.

- `r1_zero`: the R1-Zero template of the CoDistill reproduction (PAPERS.md sec. 1): the model thinks inside
  `<think>...</think>` and answers inside `<answer>...</answer>`; the prompt ends with "Assistant: <think>".
- `r1_short`: the same tags without the preamble ("User: {question}\\nAssistant: <think>"), the offline
  default. [choice] The full R1-Zero preamble is about 400 characters, i.e. 400 tokens for the
  character-level tiny models; it carries no information a tiny model can use and would triple every
  step's cost.
- `boxed`: the Qwen2.5-Math chat prompt; the answer is the last `\\boxed{...}`.

A hint (Scaf-GRPO) is appended to the question: "<question> Hint: <hint text>".
"""

from dataclasses import dataclass

from apps.math_reasoning.data import last_boxed

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)
R1_SHORT = "User: {question}\nAssistant: <think>"
BOXED = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class Template:
    """How a question becomes a prompt, where the answer sits in a completion, and the closing tags that
    earn the format reward."""

    name: str
    text: str
    answer_style: str  # "tags" or "boxed"

    def render(self, question: str, hint: str | None = None) -> str:
        """The prompt text; `hint` (Scaf-GRPO) is appended to the question."""
        return self.text.format(question=question if not hint else f"{question} Hint: {hint}")

    def extract(self, completion: str) -> str | None:
        """The answer in a completion, or None when it is not where the template asks for it."""
        if self.answer_style == "boxed":
            return last_boxed(completion)
        return answer_in_tags(completion)

    def target(self, steps: list[str], answer: str) -> str:
        """The SFT completion for worked `steps` and the final `answer`, in this template's format."""
        if self.answer_style == "boxed":
            return f"{', '.join(steps)}. The answer is \\boxed{{{answer}}}."
        return f"{', '.join(steps)}</think><answer>{answer}</answer>"


TEMPLATES = {
    "r1_zero": Template("r1_zero", R1_ZERO, "tags"),
    "r1_short": Template("r1_short", R1_SHORT, "tags"),
    "boxed": Template("boxed", BOXED, "boxed"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template: unknown template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def answer_in_tags(completion: str) -> str | None:
    """The text of the last complete `<answer>...</answer>`, stripped; None without one.

    >>> answer_in_tags("x</think> <answer> 42 </answer>"), answer_in_tags("<answer>42")
    ('42', None)
    """
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>") : end].strip()
