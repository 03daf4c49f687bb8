"""Hook mechanics: read and edit the inputs of decoder layers with forward pre-hooks.

Decoder layers are ``model.get_decoder().layers`` (never the vision tower's). Hooks read only the
first positional argument, the hidden states ``(batch, seq, hidden)``, because keyword names change
between transformers releases. Hooks are registered inside context managers and always removed,
also when the forward raises; modules are never replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


class _StopForward(Exception):
    """Raised by the last capture hook: layers past the fusion range need not run."""


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]  # a layer called with keywords only (not seen in transformers 5)


def _replace_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def layer_pre_hooks(layers: Sequence[torch.nn.Module], hooks: dict[int, HookFn]) -> Iterator[None]:
    """Install ``hooks[i]`` on ``layers[i]``; a hook returns new hidden states or None (unchanged)."""
    handles = []

    def wrap(fn: HookFn):
        def pre_hook(module, args, kwargs):
            edited = fn(_hidden_states(args, kwargs))
            return None if edited is None else _replace_hidden_states(args, kwargs, edited)

        return pre_hook

    try:
        for index, fn in hooks.items():
            handles.append(layers[index].register_forward_pre_hook(wrap(fn), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture_layer_inputs(model, layers: Sequence[torch.nn.Module], inputs: dict, start: int, end: int) -> list[torch.Tensor]:
    """Inputs of ``layers[start:end]`` for the prefill of ``inputs``: a list of ``(batch, seq, hidden)``.

    The prefill runs through ``generate`` (one new token) so position ids, masks and multimodal
    bookkeeping are exactly those of a later ``generate`` call on the same inputs; the forward stops
    after the input of ``layers[end - 1]`` is read.
    """
    captured: dict[int, torch.Tensor] = {}

    def recorder(index: int) -> HookFn:
        def record(hidden: torch.Tensor) -> None:
            captured[index] = hidden.detach().clone()
            if index == end - 1:
                raise _StopForward

        return record

    with layer_pre_hooks(layers, {i: recorder(i) for i in range(start, end)}):
        try:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        except _StopForward:
            pass
    missing = [i for i in range(start, end) if i not in captured]
    if missing:
        raise RuntimeError(f"capture hooks on decoder layers {missing} never fired")
    return [captured[i] for i in range(start, end)]


class PrefillEditor:
    """Pre-hooks that edit the prefill pass only and check that every one of them fired once.

    ``edits[i]`` maps the hidden states of layer ``start + i`` at prefill to new ones. Every later
    call (a decode step, length 1) passes untouched. ``calls`` records ``(layer, seq_len, edited)``.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], start: int, edits: Sequence[HookFn]):
        self.layers = layers
        self.start = start
        self.edits = list(edits)
        self.calls: list[tuple[int, int, bool]] = []
        self._prefilled: set[int] = set()

    def _hook(self, index: int, edit: HookFn) -> HookFn:
        def hook(hidden: torch.Tensor) -> torch.Tensor | None:
            first = index not in self._prefilled
            self._prefilled.add(index)
            self.calls.append((index, hidden.shape[1], first))
            return edit(hidden) if first else None

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[PrefillEditor]:
        hooks = {self.start + i: self._hook(self.start + i, edit) for i, edit in enumerate(self.edits)}
        with layer_pre_hooks(self.layers, hooks):
            yield self
        never = sorted(set(hooks) - self._prefilled)
        if never:
            raise RuntimeError(f"fusion hooks on decoder layers {never} never fired: is the layer range right?")
