"""qlora_cli/loss.py: the chunked loss equals the library's loss, value and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_cli.loss import chunked_cross_entropy, loss_in_chunks


def _library_loss(hidden, weight, labels, num_items_in_batch=None):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(hidden @ weight.t(), labels, weight.shape[0], num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_chunked_cross_entropy_equals_library_loss_and_gradients(num_items_in_batch):
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = -100  # masked prompt
    labels[2, 11:] = -100  # padding
    expected = _library_loss(hidden, weight, labels, num_items_in_batch)
    want_h, want_w = torch.autograd.grad(expected, (hidden, weight))
    # A chunk of 4 tokens: many chunks, one of them partial.
    got = chunked_cross_entropy(hidden, weight, labels, num_items_in_batch, chunk_tokens=4)
    got_h, got_w = torch.autograd.grad(got * 1.0, (hidden, weight))
    # Both compute the softmax in fp32 (the library upcasts the logits), so 1e-5 is the bar.
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_h, want_h, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_scales_gradients_by_the_upstream_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 9))
    (want,) = torch.autograd.grad(3.0 * _library_loss(hidden, weight, labels), hidden)
    (got,) = torch.autograd.grad(3.0 * chunked_cross_entropy(hidden, weight, labels, chunk_tokens=5), hidden)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_tiny_qlora_model_trains_with_the_same_loss_and_lora_gradients_in_chunks(tiny_model):
    """The whole 4-bit + LoRA model: loss and every LoRA gradient within 1e-5 of the plain loss."""
    from qlora_cli.collate import PackedCollator

    rows = [{"input_ids": list(range(5, 45)), "labels": [-100] * 3 + list(range(8, 45)), "seq_lengths": [15, 25]},
            {"input_ids": list(range(100, 130)), "labels": list(range(100, 130)), "seq_lengths": [30]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    tiny_model.train()

    def loss_and_grads(chunked: bool):
        tiny_model.zero_grad()
        with loss_in_chunks(tiny_model, enabled=chunked):
            loss = tiny_model(**batch, num_items_in_batch=torch.tensor(60)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads(False)
    chunked_loss, chunked_grads = loss_and_grads(True)
    tiny_model.zero_grad()
    assert abs(chunked_loss.item() - plain_loss.item()) <= 1e-5 * abs(plain_loss.item())
    assert plain_grads and plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-5, atol=1e-7), name
    # The context restores the model: real logits again afterwards.
    assert tiny_model(**batch).logits.shape[-1] == tiny_model.config.vocab_size


@pytest.mark.slow
def test_loss_in_chunks_leaves_evaluation_alone(tiny_model):
    tiny_model.eval()
    try:
        ids = torch.tensor([[5, 6, 7, 8]])
        with loss_in_chunks(tiny_model):
            logits = tiny_model(input_ids=ids).logits
        assert logits.shape[-1] == tiny_model.config.vocab_size
    finally:
        tiny_model.train()


def test_the_label_prepare_masks_with_is_the_one_the_librarys_loss_skips():
    from qlora_cli.loss import library_ignore_index
    from qlora_cli.templates import IGNORE_INDEX

    assert IGNORE_INDEX == library_ignore_index() == -100
