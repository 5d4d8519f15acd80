"""The loss graph: a causal LM whose trainable tensors are arguments, returning a loss per example.

::

    input_ids, attention_mask ──► model body (trainables substituted) ──► hidden [B, T, H]
    labels ──► shift left by one, pad with −100 ──► target [B, T]            │ rows with a
                                                       │                     ▼ target only
                                                       ▼           logits = head(hidden[valid])
                       nll[b, t] = logsumexp(logits[b, t]) − logits[b, t, target[b, t]]
                       loss[b]   = Σ_t valid·nll / max(Σ_t valid, 1)
                       valid     = target[b, t] ≠ −100  and  attention_mask[b, t] ≠ 0
                                     and  attention_mask[b, t+1] ≠ 0

Hugging Face convention: ``labels`` are aligned with ``input_ids`` and shifted inside (the
logits at position t predict the label at t+1). The loss is written as ``−gather(log_softmax)``
(``F.cross_entropy(reduction="none")`` does not export cleanly). ``position_ids`` are computed
from the attention mask and a position counts only when both it and its target are attended,
so padding on either side does not change an example's loss (with left padding, the first real
token is not "predicted" from a pad).

``torch.func.functional_call`` refuses to run under the TorchScript tracer of the legacy ONNX
exporter, so the substitution is done by hand: each trainable parameter is swapped for the
argument tensor in its owning module(s) (every alias of a tied parameter) for the duration of
the call.

Encoder classification (:class:`ClassificationLossGraph`)::

    input_ids, attention_mask ──► encoder ──► hidden [B, T, H] ──► masked mean ──► [B, H]
                                   (a model with its own classifier: its logits)   │ classifier
    labels [B] (class ids) ─────────────────────────────────────► logits [B, C] ◄──┘
                       loss[b] = logsumexp(logits[b]) − logits[b, labels[b]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def causal_lm_outputs(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [batch], next_logits [batch, vocab])`` from the final hidden states.

    ``loss`` is each example's mean next-token negative log-likelihood; ``next_logits`` the
    logits at its last attended position (right padding), which ``edgezo generate`` samples
    from. The head runs once, on the rows that have a target followed by the last rows: the LM
    head is most of a small model's forward (SmolLM2: a 49,152 x 576 matmul per token, about
    70% of an evaluation of the last two blocks), and padding and each example's last token
    have no target. One call keeps one copy of the head's weight in the graph.

    The labels are shifted left (and padded with one ignored position) rather than the hidden
    states sliced. The per-row loss is one ``LogSoftmax`` over every head row (the last rows'
    placeholder targets are dropped afterwards), so the [rows, vocab] block is neither copied
    for the scored rows nor passed through separate Sub/Exp/ReduceSum kernels: head + loss on
    8x64 rows went from 232.7 to 207.9 ms (ONNX Runtime CPU, 2 threads, median of 9; losses
    within 1e-6). ``ReduceLogSumExp`` is avoided: its CPU kernel was 3x slower and less accurate.
    """
    batch, width = attention_mask.shape
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    target_mask = F.pad(attention_mask[:, 1:], (0, 1), value=0)
    valid = (target != IGNORE_INDEX) & (target_mask != 0) & (attention_mask != 0)
    rows = valid.reshape(-1).nonzero().squeeze(-1)
    last = (attention_mask.sum(dim=-1) - 1).clamp(min=0)
    last_rows = torch.arange(batch, device=last.device) * width + last
    picked_rows = torch.cat([rows, last_rows])
    logits = head(hidden.reshape(-1, hidden.size(-1)).index_select(0, picked_rows)).float()
    picked_targets = torch.cat([target.reshape(-1).index_select(0, rows), torch.zeros_like(last)])
    log_probs = F.log_softmax(logits, dim=-1)
    per_row = -log_probs.gather(-1, picked_targets.unsqueeze(-1)).squeeze(-1)
    scored = rows.size(0)
    flat = torch.zeros(valid.numel(), dtype=logits.dtype, device=logits.device)
    nll = flat.scatter(0, rows, per_row[:scored]).view(valid.shape)
    count = valid.sum(dim=-1).clamp(min=1).to(nll.dtype)
    next_logits = logits[scored:]
    return nll.sum(dim=-1) / count, next_logits


class _SubstitutedGraph(nn.Module):
    """A model whose parameters ``names`` are replaced by argument tensors during a call."""

    #: the graph's outputs after ``loss`` (ONNX output names)
    extra_output = ""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)
        aliases: dict[int, list[tuple[nn.Module, str]]] = {}
        for full_name, p in model.named_parameters(remove_duplicate=False):
            module_name, _, leaf = full_name.rpartition(".")
            aliases.setdefault(id(p), []).append((model.get_submodule(module_name), leaf))
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"not parameters of the model: {missing}")
        self._slots = [aliases[id(params[n])] for n in self.names]

    @contextmanager
    def _substituted(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        if len(tensors) != len(self._slots):
            raise ValueError(f"expected {len(self._slots)} trainable tensors, got {len(tensors)}")
        saved = []
        try:
            for slots, t in zip(self._slots, tensors, strict=True):
                for module, leaf in slots:
                    saved.append((module, leaf, module._parameters[leaf]))
                    module._parameters[leaf] = t
            yield
        finally:
            for module, leaf, p in reversed(saved):
                module._parameters[leaf] = p


@contextmanager
def _head_bypassed(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """``model``'s output-embedding child replaced by an identity for the duration."""
    names = [name for name, child in model.named_children() if child is head]
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__}'s LM head is not one of its direct children")
    setattr(model, names[0], nn.Identity())
    try:
        yield
    finally:
        setattr(model, names[0], head)


@contextmanager
def _config_unset(model: nn.Module, field: str) -> Iterator[None]:
    """``model.config.<field>`` set to None for the duration (when the config has it)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, field, None) is None:
        yield
        return
    value = getattr(config, field)
    setattr(config, field, None)
    try:
        yield
    finally:
        setattr(config, field, value)


class SoftCappedHead(nn.Module):
    """``cap · tanh(head(x) / cap)``: a head whose logits the model soft-caps (Gemma 2's
    ``final_logit_softcapping``), which a wrapper reading the head itself must apply too."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head = head
        self.cap = float(cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(x) / self.cap) * self.cap


class CausalLMLossGraph(_SubstitutedGraph):
    """``forward(input_ids, attention_mask, labels, trainables) -> (loss [batch],
    next_logits [batch, vocab])``.

    ``trainables`` is a list of tensors in the order of ``names`` (state-dict keys of
    ``model``); they replace the model's parameters for the call. The model's own forward runs
    with its head bypassed, so what its forward does to the logits after the head (a config's
    ``final_logit_softcapping``) is applied here, once for every family.
    """

    extra_output = "next_logits"

    def __init__(self, model: nn.Module, names: Sequence[str], pass_position_ids: bool = True):
        super().__init__(model, names)
        self.pass_position_ids = pass_position_ids
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.logit_softcap = float(cap) if cap else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        trainables: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.pass_position_ids:
            kw["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        head = self.model.get_output_embeddings()
        with self._substituted(trainables):
            with (
                _head_bypassed(self.model, head),
                _config_unset(self.model, "final_logit_softcapping"),
            ):
                # the model's own forward (its ONNX node names stay /model/model/layers.N/...),
                # returning the hidden states its head would have read (not soft-capped: the
                # cap belongs to the logits, applied below)
                hidden = self.model(**kw).logits
            if self.logit_softcap is not None:
                head = SoftCappedHead(head, self.logit_softcap)
            return causal_lm_outputs(hidden, head, labels, attention_mask)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``[batch]`` of ``logits [batch, classes]`` at class ids."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    peak = logits.amax(dim=-1, keepdim=True).detach()
    return (logits - peak).exp().sum(dim=-1).log() + peak.squeeze(-1) - picked


class MeanPoolClassifier(nn.Module):
    """A bare encoder (sentence-transformers style) + a linear head over the mean of its last
    hidden states at attended positions: ``forward(input_ids, attention_mask) -> logits``.

    The encoder is stored under its Hugging Face ``base_model_prefix`` (``bert``), so the
    parameter names are those of the family's ``...ForSequenceClassification``
    (``bert.encoder.layer.0...``, ``classifier.weight``).
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.prefix = encoder.base_model_prefix
        setattr(self, self.prefix, encoder)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.config = encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = getattr(self, self.prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


class ClassificationLossGraph(_SubstitutedGraph):
    """``forward(input_ids, attention_mask, labels [batch], trainables) -> (loss [batch],
    logits [batch, classes])`` for a :class:`MeanPoolClassifier` or a Hugging Face
    ``...ForSequenceClassification`` model (its ``.logits``)."""

    extra_output = "logits"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        trainables: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._substituted(trainables):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        return classification_loss(logits, labels), logits
