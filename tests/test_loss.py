"""model/loss.py: the chunked loss equals the library's loss, value and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_cli.model.loss import chunked_cross_entropy, loss_in_chunks


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
    from qlora_cli.data.collate import PackedCollator

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
    # The context restores the model: real logits and the library's own loss again afterwards.
    after = tiny_model(**batch, num_items_in_batch=torch.tensor(60))
    assert after.logits.shape[-1] == tiny_model.config.vocab_size
    assert abs(after.loss.item() - plain_loss.item()) <= 1e-6 * abs(plain_loss.item())


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
    from qlora_cli.model.loss import library_ignore_index
    from qlora_cli.data.templates import IGNORE_INDEX

    assert IGNORE_INDEX == library_ignore_index() == -100


def test_chunked_log_probs_equal_log_softmax_with_statistics_and_gradients():
    """Per-token log-probs and TRL's statistics equal the full-logits computation; the gradient of
    any weighting of the log-probs equals autograd's through the full logits."""
    from qlora_cli.model.loss import LOG_PROB_STATISTICS, chunked_log_probs

    torch.manual_seed(0)
    tokens, weight = torch.randn(23, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (23,))
    targets[0], weight[30], tokens[0] = 30, weight[7], weight[7] * 5  # row 0: its target ties with token 7
    upstream = torch.randn(23)

    leaf = tokens.clone().requires_grad_()
    log_p = torch.log_softmax(leaf @ weight.t(), -1)
    want = log_p.gather(1, targets[:, None]).squeeze(1)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), leaf)
    probs = log_p.detach().exp()
    logits = tokens @ weight.t()
    want_statistics = {"entropy": -(probs * log_p.detach()).sum(-1), "log_sum_sq_probs": (probs ** 2).sum(-1).log(),
                       "mean_logits": logits.mean(-1), "is_top1": logits.argmax(-1) == targets}
    assert not want_statistics["is_top1"][0]

    leaf = tokens.clone().requires_grad_()
    got, statistics = chunked_log_probs(leaf, weight, targets, LOG_PROB_STATISTICS, chunk_tokens=5)  # 5 chunks
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), leaf)
    assert torch.allclose(got, want.detach(), atol=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-5)
    assert statistics.keys() == want_statistics.keys()
    for name, value in want_statistics.items():
        assert torch.allclose(statistics[name].to(value.dtype), value, atol=1e-5), name
    with torch.no_grad():  # the reference pass: no gradient work, same values
        assert torch.allclose(chunked_log_probs(tokens, weight, targets)[0], got.detach())
    with pytest.raises(ValueError, match="unknown statistics"):
        chunked_log_probs(tokens, weight, targets, ("entropy", "perplexity"))


def assert_log_prob_head_equals_trls(model, **forward_kwargs):
    """qlora's head for DPO/KTO (install_log_prob_head) returns what TRL's fused head returns on a
    4-bit + LoRA model: per-token log-probs, statistics, loss and MoE aux loss, and the same LoRA
    gradients; any other call still gets the model's logits."""
    from trl.trainer.utils import add_fused_lm_head

    from qlora_cli.model.loss import LOG_PROB_STATISTICS, output_head
    from qlora_cli.training.preference_trainer import install_log_prob_head

    inner, _ = output_head(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 0, 0, 0]])
    attention = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = ids.masked_fill(torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 1, 1]]).bool(), -100)
    model.train()

    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels, **forward_kwargs}
    try:
        add_fused_lm_head(inner, outputs=("log_probs", *LOG_PROB_STATISTICS))
        trl_out, trl_grads = fused_pass(model, torch.tensor([1.5, -0.5]), **inputs)
        assert install_log_prob_head(model, LOG_PROB_STATISTICS)
        ours, our_grads = fused_pass(model, torch.tensor([1.5, -0.5]), **inputs)
        plain = model(input_ids=ids, attention_mask=attention)  # any other call: the model's own forward
        assert plain.logits.shape == (2, 8, inner.config.get_text_config().vocab_size)
    finally:
        del inner.forward
        model.zero_grad()
    names = ("log_probs", "loss", *LOG_PROB_STATISTICS) + (("aux_loss",) if forward_kwargs else ())
    assert_same_pass(ours, our_grads, trl_out, trl_grads, names)


def fused_pass(model, weights, **inputs):
    """`model(..., fused_lm_head=True)` and the backward of its rows' log-probs weighted by
    `weights` (plus the MoE aux loss): the outputs and every LoRA gradient."""
    model.zero_grad()
    out = model(**inputs, fused_lm_head=True)
    loss = (out.log_probs.sum(-1) * weights).sum()
    (loss if out.aux_loss is None else loss + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_pass(got, got_grads, want, want_grads, names):
    """The same label mask, the outputs `names` within 1e-5, each LoRA gradient within 1e-5 of its largest entry."""
    assert torch.equal(got.label_mask, want.label_mask)
    for name in names:
        assert torch.allclose(getattr(got, name).float(), getattr(want, name).float(), atol=1e-5), name
    assert want_grads and want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name  # fp32 rounding


@pytest.mark.slow
def test_preference_log_prob_head_equals_trls_fused_head(tiny_model):
    assert_log_prob_head_equals_trls(tiny_model)


@pytest.mark.slow
def test_preference_log_prob_head_equals_trls_on_a_mixture_of_experts_with_its_aux_loss():
    from test_experts import mixtral_recipe

    from qlora_cli.model.load import load_trainable_model

    assert_log_prob_head_equals_trls(load_trainable_model(mixtral_recipe()), output_router_logits=True)


@pytest.mark.slow
def test_preference_log_prob_head_equals_trls_on_a_vision_language_model(tmp_path):
    from test_families import family_recipe

    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.load import load_recipe

    assert_log_prob_head_equals_trls(load_trainable_model(load_recipe([family_recipe(tmp_path, "mistral3")])))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_dpo_pairs_with_their_prompt_run_once_give_the_log_probs_and_gradients_of_separate_rows(tiny_model, attention):
    assert_shared_rows_equal_separate_rows(tiny_model, attention)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "mistral3"])
def test_dpo_pairs_run_with_their_prompt_once_on_a_mixture_of_experts_and_a_vision_language_model(family, tmp_path):
    from test_experts import mixtral_recipe
    from test_families import family_recipe

    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.load import load_recipe

    recipe = mixtral_recipe() if family == "mixtral" else load_recipe([family_recipe(tmp_path, family)])
    assert_shared_rows_equal_separate_rows(load_trainable_model(recipe), "sdpa")


def assert_shared_rows_equal_separate_rows(model, attention: str):
    """share_prompts: each pair as one row, its prompt once. Per-token log-probs, statistics and
    every LoRA gradient equal those of the chosen and rejected rows run separately."""
    from qlora_cli.model.loss import LOG_PROB_STATISTICS, output_head
    from qlora_cli.training.preference_trainer import install_log_prob_head

    inner, _ = output_head(model)
    prompts = [[1, 3, 50, 51, 52, 53, 4], [1, 3, 60, 4]]
    answers = [([70, 71, 2], [80, 2]), ([90, 91, 92, 93, 2], [90, 94, 2])]  # pair 2 shares a token past its prompt
    sequences = [p + a[k] for k in (0, 1) for p, a in zip(prompts, answers)]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    completion = torch.tensor([[0] * len(p) + [1] * len(a[k]) + [0] * (width - len(p) - len(a[k]))
                               for k in (0, 1) for p, a in zip(prompts, answers)])
    labels = ids.masked_fill(completion == 0, -100)
    weights = torch.tensor([1.5, -0.5, 0.7, -1.2])
    model.train()
    before = inner.config._attn_implementation
    inner.set_attn_implementation(attention)

    embedded = []  # the (rows, tokens) the backbone ran on
    hook = inner.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].shape))

    def outputs_and_grads(share: bool):
        assert install_log_prob_head(model, LOG_PROB_STATISTICS, share_prompts=share)
        try:
            return fused_pass(model, weights, input_ids=ids, attention_mask=attention_mask, labels=labels)
        finally:
            del inner.forward

    try:
        separate, separate_grads = outputs_and_grads(False)
        shared, shared_grads = outputs_and_grads(True)
    finally:
        hook.remove()
        inner.set_attn_implementation(before)
        model.zero_grad()
    assert embedded == [(4, 10), (2, 12)]  # 2 rows of 12 (prompt once) instead of 4 rows of 10
    assert shared.label_mask.sum() == completion.sum()
    assert_same_pass(shared, shared_grads, separate, separate_grads, ("log_probs", *LOG_PROB_STATISTICS))
