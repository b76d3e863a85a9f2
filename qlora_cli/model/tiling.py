"""The MLP over slices of the sequence (`model.tiled_mlp`), so a layer's temporaries are a slice's.

A decoder layer's MLP is the widest part of its forward pass: gate_proj and up_proj each make an
`intermediate_size` vector per token (3.5 x the hidden size in Mistral-7B), SiLU and the product
make two more, and every LoRA module on them keeps its input. Autograd keeps all of that for the
whole row until the layer's backward, even under activation checkpointing (the recomputed layer
holds it while its backward runs). The MLP works on each token alone, so it can run on a slice of
the row at a time: here the forward computes it slice by slice without keeping anything but the
MLP's input, and the backward recomputes one slice, takes that slice's gradients and lets it go.
The result is the same function; only the order of the sums in the weight gradients changes.

The idea is the Arctic long-sequence training's TiledMLP (ALST, also axolotl's `tiled_mlp`); this
one hands the trainable parameters (the LoRA weights) to its autograd Function as inputs and
returns their gradients, so autograd accumulates them once per step as usual (DDP's reducer sees
one gradient per parameter), instead of letting each slice add into `.grad` itself.
"""

from __future__ import annotations

import types

MIN_SLICE_TOKENS = 1024  # below this a slice's Python and dequantization overhead stops paying off


def slice_tokens(hidden_size: int) -> int:
    """Tokens per slice: ALST's choice of about `hidden_size` tokens, which makes a slice's
    intermediate activations as large as one MLP weight; never fewer than MIN_SLICE_TOKENS."""
    return max(hidden_size, MIN_SLICE_TOKENS)


def dense_mlps(model) -> list:
    """The decoder layers' dense MLPs (gate/up/down projections): token-wise, so safe to tile.
    Mixture-of-experts blocks route tokens and return router logits: left whole."""
    return [module for name, module in model.named_modules()
            if name.endswith(".mlp") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))]


def tile_mlps(model, tokens: int | None = None) -> int:
    """Make every dense MLP of `model` compute over slices of `tokens` tokens (default:
    `slice_tokens(hidden_size)`); returns how many it changed. The modules' state_dict is unchanged."""
    mlps = dense_mlps(model)
    if tokens is None:
        tokens = slice_tokens(model.config.get_text_config().hidden_size)
    for mlp in mlps:
        whole = type(mlp).forward.__get__(mlp)  # the class's own forward, bound: never a tiled one
        mlp.forward = types.MethodType(_tiled_forward(whole, tokens), mlp)  # an instance attribute
    return len(mlps)


def untile_mlps(model) -> None:
    for mlp in dense_mlps(model):
        mlp.__dict__.pop("forward", None)


def _tiled_forward(whole, tokens: int):
    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs or hidden_states.dim() < 2 or hidden_states.shape[-2] <= tokens:
            return whole(hidden_states, *args, **kwargs)  # one slice anyway: nothing to gain
        trainable = [p for p in self.parameters() if p.requires_grad]
        return tiled_apply(whole, tokens, hidden_states, trainable)

    return forward


def tiled_apply(function, tokens: int, hidden_states, parameters):
    """`function(hidden_states)` computed over slices of `tokens` along the sequence (dim -2), with
    gradients for `hidden_states` and for `parameters` (the trainable weights `function` reads)."""
    return _function().apply(function, tokens, hidden_states, *parameters)


_FUNCTION = None


def _function():
    """The autograd Function, built on first use so that importing this module does not import torch."""
    global _FUNCTION
    if _FUNCTION is None:
        import torch

        class TiledFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx, function, tokens, hidden_states, *parameters):
                ctx.function, ctx.tokens = function, tokens
                device = hidden_states.device
                # The backward recomputes each slice: with the same autocast and the same random
                # numbers (LoRA dropout) as this forward, as torch's checkpoint does.
                ctx.autocast = {"device_type": device.type, "enabled": torch.is_autocast_enabled(device.type),
                                "dtype": torch.get_autocast_dtype(device.type)}
                ctx.rng = _rng_state(device)
                ctx.save_for_backward(hidden_states, *parameters)
                slices = hidden_states.split(tokens, dim=-2)
                first = function(slices[0])
                shape = list(hidden_states.shape[:-1]) + [first.shape[-1]]
                output = first.new_empty(shape)
                output.narrow(-2, 0, first.shape[-2]).copy_(first)
                del first
                start = slices[0].shape[-2]
                for piece in slices[1:]:
                    output.narrow(-2, start, piece.shape[-2]).copy_(function(piece))
                    start += piece.shape[-2]
                return output

            @staticmethod
            def backward(ctx, grad_output):
                hidden_states, *parameters = ctx.saved_tensors
                want_input = ctx.needs_input_grad[2]
                grad_input = torch.empty_like(hidden_states) if want_input else None
                grad_parameters = [None] * len(parameters)
                start = 0
                with _restored_rng(hidden_states.device, ctx.rng), torch.enable_grad(), \
                        torch.autocast(**ctx.autocast):
                    for piece in hidden_states.split(ctx.tokens, dim=-2):
                        width = piece.shape[-2]
                        piece = piece.detach().requires_grad_(want_input)
                        output = ctx.function(piece)
                        inputs = ([piece] if want_input else []) + parameters
                        grads = torch.autograd.grad(output, inputs, grad_output.narrow(-2, start, width),
                                                    allow_unused=True)
                        if want_input:
                            grad_input.narrow(-2, start, width).copy_(grads[0])
                            grads = grads[1:]
                        for i, grad in enumerate(grads):
                            if grad is not None:
                                grad_parameters[i] = grad if grad_parameters[i] is None else grad_parameters[i] + grad
                        start += width
                return (None, None, grad_input, *grad_parameters)

        _FUNCTION = TiledFunction
    return _FUNCTION


def _rng_state(device):
    import torch

    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _restored_rng:
    """Within the block the random generators start where they stood at the forward; after it,
    they are back where the backward found them."""

    def __init__(self, device, state):
        import torch

        self.devices = [device] if device.type == "cuda" else []
        self.state = state
        self.fork = torch.random.fork_rng(devices=self.devices)

    def __enter__(self):
        import torch

        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.devices:
            torch.cuda.set_rng_state(self.state[1], self.devices[0])

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)
