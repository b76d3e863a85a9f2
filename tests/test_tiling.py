"""model/tiling.py: the MLP over slices of the sequence gives the untiled loss and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_cli.model.tiling import dense_mlps, tile_mlps, tiled_apply, untile_mlps


def test_a_tiled_function_gives_the_whole_output_and_gradients():
    torch.manual_seed(0)
    up, down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)

    def mlp(x):
        return down(torch.nn.functional.silu(up(x)))

    x = torch.randn(2, 23, 8, requires_grad=True)
    params = list(up.parameters()) + list(down.parameters())
    want = mlp(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *params])
    got = tiled_apply(mlp, 5, x, params)  # 5 slices, the last one partial
    got_grads = torch.autograd.grad(got.square().sum(), [x, *params])
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    for g, w in zip(got_grads, want_grads):  # equal up to the order of the slices' sums
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_the_same_in_the_recomputation():
    """The backward's recomputed slices draw the forward's dropout masks: the gradient is that of
    the output the forward returned (checked through the zeros dropout made)."""
    torch.manual_seed(0)
    x = torch.randn(1, 12, 4, requires_grad=True)
    weight = torch.randn(4, 4, requires_grad=True)
    drop = torch.nn.Dropout(0.5)
    out = tiled_apply(lambda p: drop(p @ weight), 3, x, [weight])
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    # d out / d x through a dropped unit is 0: x's gradient is (mask * 2) @ weight.T
    mask = (out != 0).float() * 2
    assert torch.allclose(grad_x, mask @ weight.t(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_qlora_model_gives_the_same_loss_and_lora_gradients_tiled(tiny_model, checkpointing):
    """4-bit base + LoRA on every linear layer, packed rows: loss and every LoRA gradient as untiled."""
    from qlora_cli.data.collate import PackedCollator

    rows = [{"input_ids": list(range(5, 45)), "labels": [-100] * 3 + list(range(8, 45)), "seq_lengths": [15, 25]},
            {"input_ids": list(range(100, 130)), "labels": list(range(100, 130)), "seq_lengths": [30]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    tiny_model.train()
    if checkpointing:
        tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tiny_model.enable_input_require_grads()

    def loss_and_grads():
        tiny_model.zero_grad()
        loss = tiny_model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}

    try:
        whole_loss, whole_grads = loss_and_grads()
        assert tile_mlps(tiny_model, tokens=7) == len(dense_mlps(tiny_model)) == 2  # 40 tokens: 6 slices
        tiled_loss, tiled_grads = loss_and_grads()
    finally:
        untile_mlps(tiny_model)
        tiny_model.zero_grad()
        if checkpointing:
            tiny_model.activation_checkpointing_disable()
    assert abs(tiled_loss.item() - whole_loss.item()) <= 1e-6 * abs(whole_loss.item())
    assert any(".mlp." in n for n in whole_grads) and whole_grads.keys() == tiled_grads.keys()
    # peft starts LoRA B at zero, so only the B matrices have a gradient at the first step.
    assert all(g.abs().sum() > 0 for n, g in whole_grads.items() if ".mlp." in n and "lora_B" in n)
    for name, grad in whole_grads.items():
        assert torch.allclose(tiled_grads[name], grad, rtol=1e-4, atol=1e-6), name
