"""Rule-based answer extraction and scoring: numbers (digits, words, decimals), option letters,
yes/no, short text."""

from __future__ import annotations

import re

NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|\b(?:" + "|".join(NUMBER_WORDS) + r")\b")
_YES_NO = re.compile(r"\b(yes|no)\b")
# matched against the upper-cased prediction, so the cue word is upper case too
_LETTER = re.compile(r"(?:^|ANSWER(?: IS)?[:\s]*|\()\s*([A-Z])(?:\)|\.|:|\s|$)")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?;:\"'")


def parse_number(text: str) -> float | None:
    text = text.strip().lower().replace(",", "")
    if text in NUMBER_WORDS:
        return float(NUMBER_WORDS[text])
    try:
        return float(text)
    except ValueError:
        return None


def extract_answer(prediction: str, gold: str, choices: list[str] | None = None) -> str:
    """The part of ``prediction`` that answers, in the form of ``gold``; "" when none is found.

    Multiple choice: the option letter (or the option whose text the prediction states).
    Numeric gold: the last number in the prediction. Yes/no gold: the first yes or no.
    Otherwise the normalised prediction.
    """
    text = prediction.strip()
    if choices:
        letters = _LETTER.findall(text.upper())
        if letters and ord(letters[-1]) - ord("A") < len(choices):
            return letters[-1]
        for index, choice in enumerate(choices):
            if normalise(choice) and normalise(choice) == normalise(text):
                return chr(ord("A") + index)
        return ""
    if parse_number(gold) is not None:
        numbers = _NUMBER.findall(text.lower())
        return numbers[-1] if numbers else ""
    if normalise(gold) in ("yes", "no"):
        found = _YES_NO.search(text.lower())
        return found.group(1) if found else ""
    return normalise(text)


def is_correct(extracted: str, gold: str, choices: list[str] | None = None) -> bool:
    if not extracted:
        return False
    if choices:
        gold_letter = gold.strip().upper()
        if len(gold_letter) != 1 and gold in choices:
            gold_letter = chr(ord("A") + choices.index(gold))
        return extracted.upper() == gold_letter
    expected, got = parse_number(gold), parse_number(extracted)
    if expected is not None:
        return got is not None and abs(expected - got) <= 1e-6 * max(1.0, abs(expected))
    return normalise(extracted) == normalise(gold)


def score_answer(record, response: str) -> dict:
    """The ablation's rule-based scoring of one VQA record (anything with answer and choices)."""
    extracted = extract_answer(response, record.answer, record.choices)
    return {"extracted": extracted, "correct": is_correct(extracted, record.answer, record.choices)}
