"""Causal-LM cross-entropy in chunks of tokens, never holding the full-vocabulary logits.

A Mistral step that trains on 2 x 2,048 tokens would otherwise keep (4,096 x 32,768) fp32
logits, their log-softmax and their gradient alive at once: about 1.5 GiB, often the largest
tensors of a QLoRA step. Here the lm_head runs over a few hundred tokens at a time; each
chunk's logits give its share of the loss and, in the same pass, its gradient with respect to
the hidden states (softmax - one-hot, times the head's weight), so nothing is recomputed in the
backward pass and at most one chunk of logits exists at any moment.

It plugs into the model's own forward (`loss_in_chunks`): the lm_head hands the hidden states
through, and the model's loss function is ours, so the Trainer, PEFT and DDP see an ordinary
forward that returns `loss`.

Preference training needs each answer token's log-probability rather than a loss:
`chunked_log_probs` is the same pass, per token, for the labelled positions only. Its gradient
with respect to a token's hidden state is that token's (one-hot - softmax) times the head's
weight, scaled by the upstream gradient of that one log-probability, so it too is computed in
the forward pass and nothing is recomputed in the backward.
"""

from __future__ import annotations

import contextlib
import inspect
import types

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32 (512 tokens of a 32k vocabulary)


def chunked_cross_entropy(hidden, weight, labels, num_items_in_batch=None, *, shift_labels=None,
                          ignore_index: int | None = None, chunk_tokens: int | None = None):
    """The loss `ForCausalLMLoss(hidden @ weight.T, labels, ...)` computes, without the logits.

    Same shift (tokens < n predict n), same reduction: summed over the labelled tokens and divided
    by `num_items_in_batch` when given (as the Trainer does across gradient accumulation), else
    their mean.
    """
    import torch

    ignore_index = library_ignore_index() if ignore_index is None else ignore_index
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = targets != ignore_index
    tokens = hidden.reshape(-1, hidden.shape[-1])[keep]  # only positions that carry a label
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = _function().apply(tokens, weight, targets[keep], chunk)
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def library_ignore_index() -> int:
    """The label the library's causal-LM loss skips: `ForCausalLMLoss`'s own default (the model's
    forward never passes one), read from it rather than typed again."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return inspect.signature(ForCausalLMLoss).parameters["ignore_index"].default


_FUNCTION = None


def _function():
    """The autograd Function: summed cross-entropy of `tokens @ weight.T` against `targets`, its
    gradients computed chunk by chunk during the forward pass. Built on first use, so that
    importing this module does not import torch."""
    global _FUNCTION
    if _FUNCTION is None:
        import torch

        class ChunkedCrossEntropy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tokens, weight, targets, chunk):
                want_tokens, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
                ctx.weight_dtype = weight.dtype
                total = torch.zeros((), dtype=torch.float32, device=tokens.device)
                grad_tokens = torch.empty_like(tokens) if want_tokens else None
                grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
                for start in range(0, tokens.shape[0], chunk):
                    piece, target = tokens[start:start + chunk], targets[start:start + chunk]
                    logits = (piece @ weight.t()).float()  # the upcast the library loss does, per chunk
                    logsumexp = logits.logsumexp(dim=-1)
                    total += (logsumexp - logits.gather(1, target[:, None]).squeeze(1)).sum()
                    if not (want_tokens or want_weight):
                        continue
                    # d(sum of CE)/d(logits) = softmax - one-hot, reusing the logits' memory.
                    probs = logits.sub_(logsumexp[:, None]).exp_()
                    probs[torch.arange(len(target), device=probs.device), target] -= 1
                    probs = probs.to(tokens.dtype)
                    if want_tokens:
                        grad_tokens[start:start + chunk] = probs @ weight
                    if want_weight:
                        grad_weight += (probs.t() @ piece).float()
                ctx.save_for_backward(grad_tokens, grad_weight)
                return total

            @staticmethod
            def backward(ctx, grad_output):
                grad_tokens, grad_weight = ctx.saved_tensors
                scale = grad_output.to(torch.float32)
                return (
                    None if grad_tokens is None else grad_tokens * scale.to(grad_tokens.dtype),
                    None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                    None, None,
                )

        _FUNCTION = ChunkedCrossEntropy
    return _FUNCTION


# What a log-prob pass can report besides the log-probabilities, all without gradient: TRL's names
# (trl.trainer.utils.FusedCausalLMOutput), which its trainers read for their metrics and weights.
LOG_PROB_STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def chunked_log_probs(tokens, weight, targets, statistics: tuple[str, ...] = (), *, chunk_tokens: int | None = None):
    """log softmax(tokens @ weight.T)[target] for each row of `tokens` (N, H), and the requested
    `LOG_PROB_STATISTICS` of each row's distribution, without the (N, V) logits. Returns the log-probs
    and a dict of the statistics. Differentiable in `tokens` only (the head must be frozen)."""
    unknown = set(statistics) - set(LOG_PROB_STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {LOG_PROB_STATISTICS}")
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    log_probs, *values = _log_prob_function().apply(tokens, weight, targets, chunk, tuple(statistics))
    return log_probs, dict(zip(statistics, values))


_LOG_PROB_FUNCTION = None


def _log_prob_function():
    """The autograd Function behind `chunked_log_probs`, built on first use (see `_function`)."""
    global _LOG_PROB_FUNCTION
    if _LOG_PROB_FUNCTION is None:
        import torch

        class ChunkedLogProbs(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tokens, weight, targets, chunk, statistics):
                if ctx.needs_input_grad[1]:
                    raise ValueError("chunked_log_probs needs a frozen head: it computes no weight gradient")
                want_grad = ctx.needs_input_grad[0]
                n = tokens.shape[0]
                log_probs = torch.empty(n, dtype=torch.float32, device=tokens.device)
                values = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else torch.float32,
                                            device=tokens.device) for name in statistics}
                grad_tokens = torch.empty_like(tokens) if want_grad else None
                for start in range(0, n, chunk):
                    piece, target = tokens[start:start + chunk], targets[start:start + chunk]
                    rows = torch.arange(len(target), device=tokens.device)
                    logits = (piece @ weight.t()).float()  # the upcast the library loss does, per chunk
                    if "mean_logits" in values:
                        values["mean_logits"][start:start + chunk] = logits.mean(-1)
                    if "is_top1" in values:  # argmax returns the first maximum: a tie with an earlier token is a miss
                        values["is_top1"][start:start + chunk] = logits.argmax(-1) == target
                    log_p = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: the logits become log p
                    log_probs[start:start + chunk] = log_p[rows, target]
                    if not (want_grad or "entropy" in values or "log_sum_sq_probs" in values):
                        continue
                    probs = log_p.exp()
                    if "entropy" in values:
                        values["entropy"][start:start + chunk] = -(probs * log_p).sum(-1)
                    if "log_sum_sq_probs" in values:
                        values["log_sum_sq_probs"][start:start + chunk] = (2 * log_p).logsumexp(-1)
                    if want_grad:  # d log p[target] / d logits = one-hot - softmax
                        probs[rows, target] -= 1
                        grad_tokens[start:start + chunk] = -(probs.to(tokens.dtype) @ weight)
                ctx.save_for_backward(grad_tokens)
                ctx.mark_non_differentiable(*values.values())
                return (log_probs, *values.values())

            @staticmethod
            def backward(ctx, grad_log_probs, *_):
                (grad_tokens,) = ctx.saved_tensors
                if grad_tokens is None or grad_log_probs is None:
                    return None, None, None, None, None
                return grad_tokens * grad_log_probs[:, None].to(grad_tokens.dtype), None, None, None, None

        _LOG_PROB_FUNCTION = ChunkedLogProbs
    return _LOG_PROB_FUNCTION


def output_head(model):
    """The causal LM under PEFT/DDP wrappers, and its lm_head when it is a plain bias-free Linear
    (a LoRA-wrapped or quantized head is left to the ordinary loss). FSDP2 turns the head into an
    `FSDPLinear` with Linear's own forward: still plain (its weight is whole while the loss runs,
    accelerate keeps the output unit gathered from its forward through its backward)."""
    import torch

    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    plain = isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward and head.bias is None
    return inner, (head if plain else None)


@contextlib.contextmanager
def loss_in_chunks(model, enabled: bool = True):
    """While active, `model(**inputs, labels=...)` computes its loss with `chunked_cross_entropy`;
    `outputs.logits` then holds the final hidden states, not logits. Off in eval mode."""
    inner, head = output_head(model) if enabled and model.training else (None, None)
    if head is None:
        yield
        return

    def chunked_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=None,
                     shift_labels=None, **_):
        return chunked_cross_entropy(logits, head.weight, labels, num_items_in_batch,
                                     shift_labels=shift_labels, ignore_index=ignore_index)

    default, inner.loss_function = inner.loss_function, chunked_loss  # transformers' public setter
    try:
        with head_passes_hidden(head):
            yield
    finally:
        inner.loss_function = default


@contextlib.contextmanager
def head_passes_hidden(head):
    """While active, the lm_head returns its input: the model's `logits` are its final hidden states."""

    def pass_hidden(self, hidden_states):
        return hidden_states

    head.forward = types.MethodType(pass_hidden, head)  # an instance attribute: state_dict unchanged
    try:
        yield
    finally:
        del head.forward
