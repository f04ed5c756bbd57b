"""Prompts and reference completions for TCM QA (PAPERS.md sec. 9).

The system prompt asks for `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` as the paper's does (our
wording; the paper's prompt is about single letters A-E, ours also says what to write for the other three
question types). The prompt is rendered with the tokenizer's own chat template (system + user message).

    prompt = build_prompt(example, tokenizer)
    target = reference_completion(example)   # the SFT target of the offline tiny model
    loose = inline_completion(example)       # the same content, tags inline: no strict format
"""

from core.data import InputError

SYSTEM_PROMPT = (
    "You are an expert in Traditional Chinese Medicine. Think about the question first, then answer. "
    "Reply exactly in the format <think>\n...\n</think>\n<answer>\n...\n</answer>. "
    "Single choice: one letter A-E. Multiple choice: all correct letters. "
    "Fill in the blank: the missing words. Open question: a short answer."
)
# The tiny offline preset's prompt: every prompt character is a token of a character-level model, and
# the paper's prompt alone is ~300 of them (our choice, named by --system-prompt short).
SHORT_SYSTEM_PROMPT = "先思考，再作答：<think>\n...\n</think>\n<answer>\n...\n</answer>"
SYSTEM_PROMPTS = {"paper": SYSTEM_PROMPT, "short": SHORT_SYSTEM_PROMPT}
TYPE_LABELS = {"single": "单选题", "multiple": "多选题", "fill": "填空题", "open": "问答题"}
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def user_message(example: dict) -> str:
    """The question with its type label and lettered options, one per line.

    >>> user_message({"type": "single", "question": "麻黄的药性是？", "options": {"A": "温", "B": "寒"}})
    '单选题：麻黄的药性是？\\nA. 温\\nB. 寒'
    """
    lines = [f"{TYPE_LABELS[example['type']]}：{example['question']}"]
    lines += [f"{letter}. {text}" for letter, text in example.get("options", {}).items()]
    return "\n".join(lines)


def build_prompt(example: dict, tokenizer, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The full prompt text through the tokenizer's chat template, ending where the assistant starts; a
    tokenizer without one (a base, not an Instruct, model) is an error naming its directory."""
    if not tokenizer.chat_template:
        raise InputError(
            f"{tokenizer.name_or_path or 'the model'}: its tokenizer has no chat template, and a TCM prompt is "
            "a chat (a system message, then the question); give an Instruct model's directory, or add a "
            "chat_template to its tokenizer_config.json"
        )
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user_message(example)},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def reference_completion(example: dict) -> str:
    """A well-formed completion: the fact as the reasoning (when known), then the gold answer.

    >>> reference_completion({"think": "麻黄性温。", "answer": "A"})
    '<think>\\n麻黄性温。\\n</think>\\n<answer>\\nA\\n</answer>'
    """
    return f"<think>\n{example.get('think', '')}\n</think>\n<answer>\n{example['answer']}\n</answer>"


def inline_completion(example: dict) -> str:
    """The reference content with the tags inline (no newlines around them), as instruction-tuned models
    often write it: strict format and tag count both score 0 on it, accuracy is unchanged. The offline
    SFT mixes it in (`--sft-format-fraction`) so that the base model follows the format only sometimes.

    >>> inline_completion({"think": "麻黄性温。", "answer": "A"})
    '<think>麻黄性温。</think>\\n<answer>A</answer>'
    """
    return f"<think>{example.get('think', '')}</think>\n<answer>{example['answer']}</answer>"
