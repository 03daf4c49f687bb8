"""Rule-based answer extraction and scoring of the real benchmarks, and the scorer ``vift eval`` uses.

Records come from :mod:`vift.benchmarks.formats` (their scoring facts travel as extra fields:
``benchmark``, ``question_type``, ``answer_type``, ``precision``, ``judge_question``).

Scoring (:func:`rule_score`): the final answer is isolated (the last ``\\boxed{...}``, else what
follows the last "answer is" / "Answer:", else the whole response), then
- multiple choice: the option letter (``(B)``, ``B.``, ``answer is B``, a lone ``B``) or an option's
  text stated as the answer; correct if it is the gold option. MathVista, as its official
  ``normalize_extracted_answer``: an answer that was stated (boxed, or after "answer is") but is
  neither a letter nor an option's text becomes the option nearest to it by edit distance;
- MathVista free form, as its official scorer: integers compared as ``str(int(float(x)))``, floats as
  ``str(round(float(x), precision))`` against the gold string; lists element-wise (the official
  scorer compares the GPT extraction's string; a rule extraction is normalised first);
- MathVision free form, as its official ``is_equal``: the normalised expression, else numeric
  equality rounded to 2 decimals (``\\frac{a}{b}`` and ``a/b`` count as numbers); multiple choice
  also accepts the gold option's text;
- MathVerse free form (its official protocol has no rule-based scorer, only the judge): the last
  number within a relative tolerance of 1e-4 of a numeric gold answer, else the normalised
  expression (LaTeX spacing, ``$``, ``\\left``/``\\right``, degree signs removed);
- with the LLM judge (:mod:`vift.benchmarks.judge`) the judge extracts the answer instead; MathVista then
  applies the same normalisation, MathVerse and MathVision (and ``vqa``) ask the judge whether the
  extraction agrees with the gold answer, as the reference protocol does.

:func:`rule_coverage` is the share of responses the rules find an answer in: reported by
``vift eval`` beside the accuracy, with or without the judge, so a rules-only number says how much
of it rests on answers the rules could read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rapidfuzz.distance import Levenshtein

from vift.benchmarks.specs import LETTERS, spec_of
from vift.data.manifests import VQARecord

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRACTION = re.compile(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]


def stated_answer(response: str) -> str | None:
    """The answer ``response`` states: the last ``\\boxed{}``, else after the last "answer is"; or None."""
    boxed = _boxed(response)
    if boxed is not None:
        return boxed.strip()
    found = list(_ANSWER_IS.finditer(response))
    if found:
        tail = response[found[-1].end() :].strip()
        if tail:
            return tail.splitlines()[0].strip()
    return None


def nearest_choice(text: str, choices: Sequence[str]) -> str:
    """The letter of the option nearest to ``text`` by edit distance (MathVista's ``get_most_similar``:
    the first of equally near options)."""
    distances = [Levenshtein.distance(text, choice) for choice in choices]
    return LETTERS[distances.index(min(distances))]


_LETTER_PATTERNS = (
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*:?\s*\(?([A-Z])\b(?![-'’])"),
    re.compile(r"(?:^|\n)\s*([A-Z])\s*(?:[.:)]|$)", re.MULTILINE),
    re.compile(r"(?:^|\s)([A-Z])[.)]?\s*$"),
)


def extract_letter(text: str, choices: Sequence[str]) -> str:
    """The option letter ``text`` answers with ("" if none): the last one stated, by position."""
    n = len(choices)
    text = text.strip()
    if len(text) == 1 and text.upper() in LETTERS[:n]:
        return text.upper()
    best: tuple[int, str] | None = None
    for pattern in _LETTER_PATTERNS:
        for found in pattern.finditer(text):
            letter = found.group(1).upper()
            if letter in LETTERS[:n] and (best is None or found.start(1) > best[0]):
                best = (found.start(1), letter)
    if best:
        return best[1]
    plain = _normalise_math(text)
    for index, choice in enumerate(choices):
        if _normalise_math(choice) and _normalise_math(choice) == plain:
            return LETTERS[index]
    return ""


def _normalise_math(text: str) -> str:
    text = text.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("°", ""), ("\\%", "%"), ("\\,", ""), ("\\!", ""), ("\\ ", ""), ("$", ""),
                     ("\\text{", "{"), ("\\mathrm{", "{"), ("√", "\\sqrt")):  # fmt: skip
        text = text.replace(old, new)
    text = re.sub(r"\s+", "", text).lower()
    return text.rstrip(".")


def _value(text: str) -> float | None:
    """The number ``text`` is (decimal, ``a/b``, ``\\frac{a}{b}``, percent stripped), else None."""
    text = _normalise_math(text).replace(",", "").rstrip("%")
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    try:
        return float(text)
    except ValueError:
        pass
    found = _FRACTION.fullmatch(text)
    if found:
        sign, top, bottom = (found.group(1), found.group(2), found.group(3)) if found.group(2) else ("", found.group(4), found.group(5))
        try:
            value = float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            return None
        return -value if sign else value
    return None


def last_number(text: str) -> str:
    """The last number in ``text`` (fractions ``\\frac{a}{b}`` / ``a/b`` kept whole), or ""."""
    candidates = [(m.start(), m.group(0)) for m in _FRACTION.finditer(text)]
    covered = [(m.start(), m.end()) for m in _FRACTION.finditer(text)]
    candidates += [(m.start(), m.group(0)) for m in _NUMBER.finditer(text) if not any(a <= m.start() < b for a, b in covered)]
    return max(candidates)[1].strip() if candidates else ""


def _close(a: float, b: float, tolerance: float = 1e-4) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(b))


def _parse_list(text: str) -> list[str] | None:
    found = re.findall(r"\[([^\[\]]*)\]", text)
    if not found:
        return None
    return [item.strip().strip("'\"") for item in found[-1].split(",") if item.strip()]


def _extra(record: VQARecord, key: str, default=None):
    return (record.model_extra or {}).get(key, default)


def extract_final(record: VQARecord, response: str, lenient_choice: bool = False) -> str:
    """The answer ``response`` gives, in the form the record's gold answer takes ("" if none).

    Multiple choice with no letter or exact option text: MathVista's normalisation takes the option
    nearest by edit distance to a stated answer (boxed, or after "answer is"); ``lenient_choice``
    (the judge's extraction, which is all answer) to the whole response.
    """
    stated = stated_answer(response)
    segment = response.strip() if stated is None else stated
    if record.choices:
        letter = extract_letter(segment, record.choices) or (extract_letter(response, record.choices) if stated is not None else "")
        nearest_of = segment if lenient_choice else stated if _extra(record, "benchmark") == "mathvista" else None
        if not letter and nearest_of:
            letter = nearest_choice(nearest_of, record.choices)
        return letter
    answer_type = _extra(record, "answer_type", "text")
    if answer_type == "list":
        items = _parse_list(segment) or _parse_list(response)
        return "[" + ", ".join(items) + "]" if items is not None else ""
    if answer_type in ("integer", "float") or _value(record.answer) is not None:
        return last_number(segment) or last_number(response)
    return segment.splitlines()[0].strip() if segment else ""


def rule_correct(record: VQARecord, extracted: str) -> bool:
    """Whether an extracted answer matches the gold one under the benchmark's rules."""
    if not extracted:
        return False
    if record.choices:
        gold = record.answer if record.answer not in record.choices else LETTERS[record.choices.index(record.answer)]
        return extracted.strip().upper() == gold.strip().upper()
    answer_type = _extra(record, "answer_type", "text")
    benchmark = _extra(record, "benchmark")
    got, gold = _value(extracted), _value(record.answer)
    if benchmark == "mathvista" and answer_type == "integer":
        return got is not None and str(int(got)) == record.answer.strip()
    if benchmark == "mathvista" and answer_type == "float":
        return got is not None and str(round(got, _extra(record, "precision") or 0)) == record.answer.strip()
    if answer_type == "list":
        ours, theirs = _parse_list(extracted), _parse_list(record.answer)
        if ours is None or theirs is None or len(ours) != len(theirs):
            return False
        precision = _extra(record, "precision")
        for a, b in zip(ours, theirs):
            va, vb = _value(a), _value(b)
            if va is not None and vb is not None:
                if (round(va, precision) != round(vb, precision)) if precision is not None else not _close(va, vb):
                    return False
            elif _normalise_math(a) != _normalise_math(b):
                return False
        return True
    if benchmark == "mathvision":
        if same_expression(extracted, record.answer):
            return True
        return got is not None and gold is not None and round(got, 2) == round(gold, 2)
    if gold is not None:
        return got is not None and _close(got, gold)
    return same_expression(extracted, record.answer)


def same_expression(extracted: str, gold: str) -> bool:
    """Normalised equality of two answers written as text or LaTeX (``x = 2\\sqrt{3}`` vs ``2√3``)."""
    ours, theirs = _normalise_math(extracted), _normalise_math(gold)
    if "=" in ours and "=" not in theirs:  # "BC = 5 cm" answers "5 cm"
        ours = ours.rsplit("=", 1)[1]

    def bare(text: str) -> str:
        return text.replace("{", "").replace("}", "")

    return bool(ours) and bare(ours) == bare(theirs)


def rule_score(record: VQARecord, response: str) -> dict:
    extracted = extract_final(record, response)
    return {"extracted": extracted, "correct": rule_correct(record, extracted), "scored_by": "rules"}


# What the rules below do, per benchmark, in a sentence: recorded in metrics.json as "extraction".
EXTRACTION = {
    "mathvista": "rules: boxed / 'answer is' / option letter or text, nearest option by edit distance; "
    "MathVista normalisation (int(float), round to precision)",
    "mathverse": "rules: boxed / 'answer is' / option letter or text; last number (rel. tol. 1e-4) or normalised expression",
    "mathvision": "rules: boxed / 'answer is' / option letter or text; normalised expression or number to 2 decimals",
    "vqa": "rules: the ablation's answer rules",
}


def make_scorer(benchmark: str, judge=None) -> Callable[[VQARecord, str], dict]:
    """``scorer(record, response) -> {"extracted", "correct", "scored_by", ...}`` for ``prediction_rows``.

    No judge: the rules above (``vqa``: the ablation's rules in :mod:`vift.scoring.answers`). With a
    :class:`~vift.benchmarks.judge.Judge`: the judge extracts; MathVista scores by exact match, the others
    by the judge's agreement verdict.
    """
    spec_of(benchmark)
    if judge is None:
        if benchmark == "vqa":
            from vift.scoring.answers import score_answer

            return lambda record, response: {**score_answer(record, response), "scored_by": "rules"}
        return rule_score

    def judged(record: VQARecord, response: str) -> dict:
        raw = judge.extract(record.question, response)
        if benchmark == "mathvista":
            extracted = extract_final(record, raw, lenient_choice=True) if raw else ""
            return {
                "extracted": extracted,
                "correct": rule_correct(record, extracted),
                "scored_by": "judge-extract",
                "judge_extracted": raw,
            }
        question = _extra(record, "judge_question") or record.question
        gold = record.answer
        if record.choices and gold in LETTERS and _extra(record, "benchmark") == "mathvision":
            gold = f"{gold} ({record.choices[LETTERS.index(gold)]})"
        verdict = judge.agrees(question, gold, raw) if raw else False
        row = {"extracted": raw, "correct": bool(verdict), "scored_by": "judge"}
        if verdict is None:
            row["judge_unparsed"] = True
        return row

    return judged


def rule_coverage(benchmark: str, records: Sequence[VQARecord], responses: Sequence[str]) -> float | None:
    """The share of responses in which the rules find an answer (None for no responses)."""
    if not records:
        return None
    rules = make_scorer(benchmark)
    return sum(1 for r, a in zip(records, responses) if str(rules(r, a)["extracted"]).strip()) / len(records)


def no_answer_count(rows: Sequence[dict]) -> int:
    return sum(1 for row in rows if not str(row.get("extracted", "")).strip())
