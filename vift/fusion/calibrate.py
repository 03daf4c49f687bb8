"""Calibration: search fusion mode x positions x layer range x weights on a calibration split.

The ``task_vector`` mode's vector is computed here, from the calibration items' captures
(:meth:`Calibrator.task_vector`), and travels in ``fusion.json`` with the chosen configuration.

A coarse grid first, then refinement around the best configuration, within a budget of evaluated
configurations. Objective: accuracy; ties are broken by the mean log-likelihood of the gold answers
under the fused model. The plain model (neutral fusion) is always a candidate, and the winner
replaces it only if it is better beyond chance, the number of configurations tried accounted for.

Captured states depend on the batch and layer range only, not on the weights, so each batch is
captured once over all layers and reused by every configuration (within a memory limit).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vift.config.schema import CalibrationParams
from vift.fusion.families import adapter_for
from vift.fusion.method import NEUTRAL, FusionSpec, align_right, capture_states, fused_positions, steered_generate
from vift.model.loading import decoder_layers
from vift.scoring.answers import score_answer
from vift.scoring.stats import beyond_chance, paired_comparison

WEIGHT_FIELDS = {"additive": ("a", "b"), "replace": ("w_vis", "w_text"), "task_vector": ("a",)}


class GoldAnswerScorer(LogitsProcessor):
    """Forces the gold answer tokens while summing their log-probabilities (teacher forcing)."""

    def __init__(self, gold: torch.Tensor, eos_token_id: int):
        self.gold = gold  # (batch, steps), -1 after the end of each answer
        self.eos_token_id = eos_token_id
        self.step = 0
        self.log_likelihood = torch.zeros(gold.shape[0], dtype=torch.float64)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = self.gold[:, self.step] if self.step < self.gold.shape[1] else torch.full_like(self.gold[:, 0], -1)
        valid = tokens >= 0
        log_probs = torch.log_softmax(scores.double(), dim=-1)
        picked = log_probs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        self.log_likelihood += torch.where(valid, picked, torch.zeros_like(picked)).cpu()
        forced = torch.full_like(scores, -math.inf)
        forced[torch.arange(scores.shape[0]), torch.where(valid, tokens, torch.full_like(tokens, self.eos_token_id))] = 0
        self.step += 1
        return forced


@dataclass
class _Batch:
    image_inputs: dict
    text_inputs: dict
    records: list
    states: tuple[list, list] | None  # captures of all layers, when within the memory limit


def candidate_ranges(num_layers: int, given: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The layer ranges to search: given ones (validated) or a spread derived from the depth."""
    if given:
        for start, end in given:
            if not 0 <= start < end <= num_layers:
                raise ValueError(f"fusion.calibrate.layer_ranges: [{start}, {end}) outside 0..{num_layers}")
        return [tuple(r) for r in given]
    n = num_layers
    spread = [(0, n), (n // 2, n), (n // 4, n), (0, n // 2), (n // 4, max(n // 4 + 1, 3 * n // 4))]
    return list(dict.fromkeys((s, e) for s, e in spread if 0 <= s < e <= n))


def capture_bytes(model, image_inputs: dict, text_inputs: dict, num_layers: int) -> int:
    """What capturing both prompts' inputs of ``num_layers`` decoder layers holds, before capturing
    it: one hidden-size vector of the model's dtype per layer and token, padding included."""
    hidden = model.config.get_text_config().hidden_size
    tokens = image_inputs["input_ids"].numel() + text_inputs["input_ids"].numel()
    return num_layers * tokens * hidden * model.dtype.itemsize


class Calibrator:
    """Evaluates fusion configurations on calibration records, with cached captures (at most
    ``max_cache_bytes`` of them: batches past the cap are captured again for every configuration)."""

    def __init__(self, model, processor, records, images, batch_size: int, max_new_tokens: int, max_cache_bytes: int = 2 << 30):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.num_layers = len(decoder_layers(model))
        adapter = adapter_for(model)
        self.batches: list[_Batch] = []
        cached = 0
        for begin in range(0, len(records), batch_size):
            chunk = records[begin : begin + batch_size]
            questions = [r.question for r in chunk]
            image_inputs = adapter.image_inputs(processor, images[begin : begin + batch_size], questions, model.device)
            text_inputs = adapter.text_inputs(processor, questions, model.device)
            states = None
            needed = capture_bytes(model, image_inputs, text_inputs, self.num_layers)
            if cached + needed <= max_cache_bytes:  # checked before capturing: the cap holds for the first batch too
                states = capture_states(model, image_inputs, text_inputs, 0, self.num_layers)
                cached += needed
            self.batches.append(_Batch(image_inputs, text_inputs, list(chunk), states))

    def _states(self, batch: _Batch, spec: FusionSpec):
        start, end = spec.layer_range(self.num_layers)
        if batch.states is None:
            return None
        return batch.states[0][start:end], batch.states[1][start:end]

    def _generate(self, batch: _Batch, spec: FusionSpec, **kwargs):
        if spec.is_neutral:
            with torch.inference_mode():
                return self.model.generate(**batch.image_inputs, **kwargs)
        return steered_generate(self.model, batch.image_inputs, batch.text_inputs, spec, states=self._states(batch, spec), **kwargs)

    def task_vector(self) -> tuple[tuple[float, ...], ...]:
        """Per decoder layer, the mean of T − V (unsteered text-only minus image+question input
        states) over every calibration item's question positions: the ``task_vector`` mode's d."""
        total, count = None, 0
        for batch in self.batches:
            text, image = batch.states or capture_states(self.model, batch.image_inputs, batch.text_inputs, 0, self.num_layers)
            ids, attention = batch.image_inputs["input_ids"], batch.image_inputs["attention_mask"]
            mask = fused_positions(ids, attention, batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"], "question")
            sums = torch.stack([(align_right(t, ids.shape[1]) - v)[mask].double().sum(dim=0) for t, v in zip(text, image)])
            total = sums if total is None else total + sums
            count += int(mask.sum())
        mean = (total / max(1, count)).tolist()
        return tuple(tuple(layer) for layer in mean)

    def correct(self, spec: FusionSpec) -> list[bool]:
        """Per calibration item, whether ``spec``'s answer is right (in record order)."""
        out = []
        for batch in self.batches:
            sequences = self._generate(batch, spec, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = sequences[:, batch.image_inputs["input_ids"].shape[1] :]
            for record, text in zip(batch.records, self.processor.batch_decode(new, skip_special_tokens=True)):
                out.append(bool(score_answer(record, text)["correct"]))
        return out

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        """Mean log-likelihood (nats) of the gold answers, end-of-turn token included."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        total, count = 0.0, 0
        for batch in self.batches:
            ids = [tokenizer(r.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in batch.records]
            gold = torch.full((len(ids), max(map(len, ids))), -1, dtype=torch.long)
            for row, tokens in enumerate(ids):
                gold[row, : len(tokens)] = torch.tensor(tokens)
            scorer = GoldAnswerScorer(gold.to(self.model.device), tokenizer.eos_token_id)
            # No min_new_tokens: its processor runs before ours and sets the end-of-turn token to -inf,
            # which every gold answer ends with. The scorer forces that token, so generation stops there.
            self._generate(batch, spec, max_new_tokens=gold.shape[1], do_sample=False, logits_processor=LogitsProcessorList([scorer]))
            total += float(scorer.log_likelihood.sum())
            count += len(ids)
        return total / max(1, count)


def _grid(
    mode: str, positions: str, layer_range: tuple[int, int], weights: Sequence[float], preserve_norm: bool = False,
    steer_prefix: bool = False, task_vector: tuple | None = None,
) -> list[FusionSpec]:  # fmt: skip
    fields = WEIGHT_FIELDS[mode]
    variant = {"preserve_norm": preserve_norm, "steer_prefix": steer_prefix, "task_vector": task_vector}
    return [
        FusionSpec(
            mode=mode, positions=positions, layer_start=layer_range[0], layer_end=layer_range[1], **variant, **dict(zip(fields, values))
        )
        for values in itertools.product(*[weights] * len(fields))
    ]


def _neighbours(spec: FusionSpec, weights: Sequence[float], ranges: Sequence[tuple[int, int]], num_layers: int) -> list[FusionSpec]:
    """Configurations next to ``spec``: adjacent and midway weights, shifted layer range ends."""
    grid = sorted(set(weights))
    result = []
    for field in WEIGHT_FIELDS[spec.mode]:
        value = getattr(spec, field)
        below = [w for w in grid if w < value]
        above = [w for w in grid if w > value]
        candidates = []
        if below:
            candidates += [below[-1], (below[-1] + value) / 2]
        if above:
            candidates += [above[0], (above[0] + value) / 2]
        result += [spec.with_weights(**{field: round(c, 4)}) for c in candidates]
    start, end = spec.layer_range(num_layers)
    for s, e in ((start - 1, end), (start + 1, end), (start, end - 1), (start, end + 1)):
        if 0 <= s < e <= num_layers:
            result.append(spec.with_weights(layer_start=s, layer_end=e))
    return result


def search(
    calibrator: Calibrator,
    params: CalibrationParams,
    progress=None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    start: FusionSpec = NEUTRAL,
) -> dict:
    """Coarse grid, then refinement; returns the chosen spec and the whole search table.

    The most accurate configuration (ties: the best gold-answer log-likelihood) is chosen only if
    it beats no fusion beyond chance (paired bootstrap CI above 0 and McNemar p below
    ``params.significance`` / configurations evaluated); otherwise no fusion is kept, and says so.
    ``start`` (``params.fusion``'s own configuration) is evaluated first after no fusion: it seeds
    the search; with ``params.search`` off it is the only candidate and is served as given.
    """
    ranges = candidate_ranges(calibrator.num_layers, params.layer_ranges)
    vector = calibrator.task_vector() if "task_vector" in params.modes and params.search else None
    coarse_weights = sorted(set(params.weights[::2]) | {params.weights[-1]})
    groups = [
        _grid(m, p, r, coarse_weights, norm, steer, vector if m == "task_vector" else None)
        for m, p, r, norm, steer in itertools.product(params.modes, params.positions, ranges, params.preserve_norm, params.steer_prefix)
        if m == "additive" or not steer  # only additive fusion steers the prefix
    ]
    # Round-robin over (mode, positions, range, variant) groups, so a truncated coarse grid covers each alike.
    grid = [spec for row in zip(*groups) for spec in row] if params.search else []
    seeds = list(dict.fromkeys([NEUTRAL, start]))  # always evaluated, whatever the budget
    coarse = list(dict.fromkeys([*seeds, *grid]))
    coarse_budget = max(len(seeds), (2 * params.budget) // 3) if params.search and len(coarse) > params.budget else len(coarse)
    table: dict[FusionSpec, dict] = {}

    correct: dict[FusionSpec, list[bool]] = {}

    def evaluate(spec: FusionSpec, phase: str) -> None:
        if spec in table or (params.search and len(table) >= max(params.budget, len(seeds))):
            return
        correct[spec] = calibrator.correct(spec)
        table[spec] = {"accuracy": sum(correct[spec]) / max(1, len(correct[spec])), "phase": phase}
        if progress:
            progress(len(table), params.budget)

    for spec in coarse[:coarse_budget]:
        evaluate(spec, "coarse" if params.search else "fixed")
    improved = params.search
    while improved and len(table) < params.budget:
        best = max(table, key=lambda s: table[s]["accuracy"])
        before = len(table)
        for spec in _neighbours(best, params.weights, ranges, calibrator.num_layers) if not best.is_neutral else []:
            evaluate(spec, "refine")
        improved = len(table) > before and max(table, key=lambda s: table[s]["accuracy"]) != best
    top = max(row["accuracy"] for row in table.values())
    tied = [spec for spec, row in table.items() if row["accuracy"] == top]
    for spec in tied if len(tied) > 1 else []:
        table[spec]["answer_log_likelihood"] = calibrator.answer_log_likelihood(spec)
    best = max(tied, key=lambda s: table[s].get("answer_log_likelihood", 0.0)) if params.search else start
    versus_neutral = {}
    for spec, row in table.items():  # each configuration against no fusion, on the same items
        comparison = versus_neutral[spec] = paired_comparison(correct[spec], correct[NEUTRAL], bootstrap_samples, seed)
        row.update(
            difference_vs_neutral=comparison["difference"],
            ci95_low_vs_neutral=comparison["ci95"][0],
            ci95_high_vs_neutral=comparison["ci95"][1],
            mcnemar_p_vs_neutral=comparison["mcnemar_p"],
        )
    # A configuration replaces no fusion only beyond chance, with the search's many tries counted
    # (Bonferroni over the configurations evaluated): the best of 60 noisy configurations on 200
    # items otherwise "wins" by luck (measured: 14.5 % vs 5.0 % on calibration, nothing on test).
    threshold = params.significance / len(table)
    chosen = best if not params.search or _kept(best, versus_neutral[best], threshold, params) else NEUTRAL
    held_out = cross_validate(correct, list(table), start, params, bootstrap_samples, seed)
    if held_out is not None:
        held_out["same_choice_folds"] = sum(choice == chosen for choice in held_out.pop("choices"))
        held_out["kept_neutral"] = False
        if params.require_held_out_gain and not chosen.is_neutral and not beyond_chance(held_out, params.significance):
            chosen, held_out["kept_neutral"] = NEUTRAL, True
    rows = [{**spec.to_dict(), "layer_end": spec.layer_range(calibrator.num_layers)[1], **row} for spec, row in table.items()]
    return {
        "fusion": {**chosen.to_dict(), "layer_end": chosen.layer_range(calibrator.num_layers)[1], **chosen.vector_dict()},
        "calibration": {
            "accuracy": table[chosen]["accuracy"],
            "best_accuracy": top,
            "best": {**best.to_dict(), "layer_end": best.layer_range(calibrator.num_layers)[1]},
            "best_versus_neutral": {
                **{key: versus_neutral[best][key] for key in ("difference", "ci95", "mcnemar_p")},
                "threshold": threshold,
                "kept_neutral": chosen is not best,
            },
            "cross_validated": held_out,
            "unfused_accuracy": table[NEUTRAL]["accuracy"],
            "chosen_is_neutral": chosen.is_neutral,
            "searched": params.search,
            "tied_at_top": len(tied),
            "evaluated": len(table),
            "budget": params.budget,
            "items": sum(len(b.records) for b in calibrator.batches),
            "layer_ranges": ranges,
            "num_layers": calibrator.num_layers,
        },
        "search": rows,
    }


def _kept(best: FusionSpec, evidence: dict, threshold: float, params: CalibrationParams) -> bool:
    """Whether the search's most accurate configuration replaces no fusion: it is no fusion, the
    check is off (significance 1), or it beats no fusion beyond chance at ``threshold``."""
    return best.is_neutral or params.significance >= 1 or beyond_chance(evidence, threshold)


def cross_validate(
    correct: dict[FusionSpec, list[bool]], order: Sequence[FusionSpec], start: FusionSpec, params: CalibrationParams,
    bootstrap_samples: int, seed: int,
) -> dict | None:  # fmt: skip
    """The choice's gain over no fusion on items it was not chosen on: k-fold over the calibration items.

    For each fold, the rule of :func:`search` (most accurate, beating no fusion beyond chance at
    ``significance`` / configurations) chooses among the evaluated configurations on the other
    folds' items alone, and the fold's items are answered by that choice. The held-out answers,
    every item once, are compared with no fusion's. Ties go to the earlier configuration (the
    gold log-likelihood tie-break is computed on every item, so it would see the held-out ones).
    The refinement phase did see every item when it chose what to evaluate: the estimate is of
    the choice among these configurations, not of the whole search. ``None`` below two folds.
    Written by hand: scikit-learn's KFold would be the only use of a large dependency.
    """
    items = len(correct[NEUTRAL])
    folds = min(params.folds, items)
    if folds < 2:
        return None
    fold = np.empty(items, dtype=int)
    fold[np.random.default_rng(seed).permutation(items)] = np.arange(items) % folds
    right = {spec: np.asarray(correct[spec], dtype=bool) for spec in order}
    threshold = params.significance / len(order)
    answered = np.zeros(items, dtype=bool)
    choices = []
    for k in range(folds):
        rest = fold != k
        choice = start
        if params.search:
            best = max(order, key=lambda spec: right[spec][rest].mean())  # the first of equals
            evidence = paired_comparison(right[best][rest], right[NEUTRAL][rest], bootstrap_samples, seed)
            choice = best if _kept(best, evidence, threshold, params) else NEUTRAL
        answered[fold == k] = right[choice][fold == k]
        choices.append(choice)
    comparison = paired_comparison(answered, right[NEUTRAL], bootstrap_samples, seed)
    return {
        "folds": folds,
        "accuracy": float(answered.mean()),
        **comparison,
        "fused_folds": sum(not choice.is_neutral for choice in choices),
        "choices": choices,
    }
