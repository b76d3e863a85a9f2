"""The arithmetic of `qlora plan`: bytes per device and FLOPs per token, from a model's shape.

Every figure counts what this CLI's own loading path (`qlora_cli.model.load.load_trainable_model`)
really allocates, checked against the tensors of a loaded tiny model in tests/test_plan.py:

- bitsandbytes 4-bit: two weights per uint8, one absmax per 64-weight block (fp32; with
  double quantization uint8, plus an fp32 absmax per 256 of those and a 256-entry fp32 code),
  a 16-entry fp32 code and an fp32 offset per layer;
- embeddings, norms and lm_head stay in `model.dtype`, and so does the residual stream; with
  `model.upcast_to_fp32` (peft's `prepare_model_for_kbit_training`) they are fp32 under quantization;
- peft keeps LoRA weights in fp32 (`autocast_adapter_dtype`), hence fp32 gradients too (in
  `model.dtype` under FSDP);
- activations are the tensors autograd saves per token (derived from Mistral's forward, see
  `layer_activation_bytes`; in MoE layers the routed experts' loop and MLA attention), the
  logits cost 12 bytes per token per vocabulary entry at the start of the backward pass (fp32
  log-probabilities saved by cross-entropy, their gradient and the gradient of the logits);
- `model.tiled_mlp` leaves a dense MLP's input per token and one slice's activations
  (qlora_cli.model.tiling); `training.activation_offloading` moves what autograd saves outside the
  checkpointed layers to CPU memory (`offloaded_bytes`), a few tensors in flight staying on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlora_cli.families import FAMILIES, Family, auto_model_class, skipped

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS workspace: 0.5-1 GiB in practice
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes of optimizer state per trainable parameter (TrainingArguments.optim names).
_OPTIMIZER_BYTES = [
    ("8bit", 2), ("lion", 4), ("sgd", 0), ("adafactor", 0), ("adagrad", 4), ("rmsprop", 4), ("adam", 8),
]


def dtype_bytes(name: str | None) -> int:
    return _DTYPE_BYTES.get(str(name).replace("torch.", ""), 4)


@dataclass
class ModelShape:
    """What memory and FLOPs depend on, read from a transformers config (no weights)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    linears: list[tuple[str, int, int]]  # every nn.Linear in the model: (name, in, out)
    other_params: dict[str, int]  # name -> numel of every parameter outside those Linears
    buffer_bytes: int
    output_linear: str = "lm_head"
    max_positions: int = 0
    family: Family | None = None  # qlora_cli.families: what is outside the language model
    experts: list[tuple[str, int, int, int]] = field(default_factory=list)  # fused expert tensors: (name, experts, out, in)
    experts_per_token: int = 0  # the experts the router sends each token to (num_experts_per_tok)
    # Multi-head latent attention (mistral4): (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim) from the config; None for grouped-query attention.
    mla: tuple[int, int, int, int, int] | None = None
    config: object = None  # the transformers config it was read from (`model_skeleton` builds the model again)

    @property
    def outside_language_model(self) -> tuple[str, ...]:
        return self.family.outside_language_model if self.family else ()

    @property
    def layer_linears(self) -> list[tuple[str, int, int]]:
        return [item for item in self.linears if item[0] != self.output_linear]

    @property
    def total_params(self) -> int:
        return sum(i * o for _, i, o in self.linears) + sum(self.other_params.values()) + self.expert_params

    @property
    def moe_layers(self) -> int:
        """How many layers hold fused experts (the rest have a dense MLP)."""
        return len({name.rsplit(".", 1)[0] for name, *_ in self.experts})

    @property
    def expert_params(self) -> int:
        return sum(e * o * i for _, e, o, i in self.experts)


def model_shape(config) -> ModelShape:
    """The shape of the model a transformers config describes, built on the meta device with
    its family's auto class; the layer figures are the language model's (its text config)."""
    from torch import nn

    family = FAMILIES.get(config.model_type)
    model, full_config = model_skeleton(config), config
    config = config.get_text_config()
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_linears = {f"{n}.weight" for n, _, _ in linears} | {f"{n}.bias" for n, _, _ in linears}
    from qlora_cli.model.experts import expert_parameters

    experts = [(f"{n}.{p}", *getattr(m, p).shape) for n, m, p in
               expert_parameters(model, family.expert_modules if family else ())]
    in_experts = {name for name, *_ in experts}
    other = {n: p.numel() for n, p in model.named_parameters() if n not in in_linears and n not in in_experts}
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), "lm_head")
    heads = config.num_attention_heads
    return ModelShape(
        vocab=config.vocab_size, hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 0),
        layers=config.num_hidden_layers, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, linears=linears,
        other_params=other, buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        output_linear=output_name, max_positions=getattr(config, "max_position_embeddings", 0) or 0, family=family,
        experts=experts, experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0, mla=_mla(config),
        config=full_config,
    )


def model_skeleton(config):
    """The model a transformers config describes, built by its family's auto class on the meta
    device: every module and shape, no memory."""
    import torch

    # The arithmetic holds for any decoder; `qlora plan` refuses the types qlora does not train.
    with torch.device("meta"):
        return auto_model_class(FAMILIES.get(config.model_type) or Family(config.model_type, "")).from_config(config)


def _mla(config) -> tuple[int, int, int, int, int] | None:
    if getattr(config, "kv_lora_rank", None) is None:
        return None
    return (getattr(config, "q_lora_rank", None) or 0, config.kv_lora_rank, config.qk_nope_head_dim,
            config.qk_rope_head_dim, config.v_head_dim)


@dataclass
class Settings:
    """The recipe's choices that memory depends on."""

    quant: str = "none"  # nf4 | fp4 | int8 | none
    double_quant: bool = False
    model_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ()
    lora_r: int = 0
    lora_targets: list[str] = field(default_factory=list)  # Linear names LoRA wraps
    # Tensors outside a Linear that peft's target_parameters reach: (name, experts, out, in, rank)
    expert_lora: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    lora_dropout: float = 0.0
    use_dora: bool = False
    optim: str = "adamw_torch"
    checkpointing: bool = False
    autocast_bytes: int | None = None  # 2 under bf16/fp16 mixed precision
    packed_mask: bool = False  # a (batch, 1, T, T) boolean mask reaches the attention
    eager_attention: bool = False
    on_gpu: bool = True
    chunked_loss: bool = False  # model.chunked_loss: logits never held whole
    tiled_mlp: bool = False  # model.tiled_mlp: a dense MLP's activations are a slice's (qlora_cli.model.tiling)
    offloading: bool = False  # training.activation_offloading: saved activations wait in CPU memory
    log_probs: bool = False  # DPO/KTO: per-token log-probs (qlora_cli.model.loss.chunked_log_probs), not a loss
    upcast: bool = False  # model.upcast_to_fp32: unquantized weights and residual stream in fp32
    lora_bytes: int = 4  # peft keeps LoRA weights in fp32 (in the model's dtype under FSDP)
    shards: int = 1  # FSDP across this many GPUs: weights, LoRA, gradients and optimizer state divided
    image_patches: int = 0  # vision-tower patches (before the spatial merge) of the row with the most

    @property
    def quantized(self) -> bool:
        return self.quant != "none"

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream and of every unquantized weight (the embeddings' dtype)."""
        return 4 if self.quantized and self.upcast else dtype_bytes(self.model_dtype)

    @property
    def matmul_bytes(self) -> int:
        return self.autocast_bytes or self.residual_bytes


@dataclass
class MemoryItem:
    name: str
    bytes: int
    how: str = ""


def quantized_linear_bytes(numel: int, out_features: int, quant: str, double_quant: bool) -> int:
    """Bytes bitsandbytes keeps for one quantized Linear weight, quantization state included."""
    if quant == "int8":
        return numel + 4 * out_features  # int8 weights + one fp32 scale per output row (SCB)
    blocks = math.ceil(numel / 64)
    packed = math.ceil(numel / 2) + 16 * 4 + 4  # + 16-entry fp32 code + fp32 offset
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4
    return packed + 4 * blocks


def weight_items(shape: ModelShape, s: Settings) -> list[MemoryItem]:
    """Base weights as quantized, and what stays unquantized."""
    quantized = [(n, i, o) for n, i, o in shape.layer_linears if not skipped(n, s.skip_modules)] if s.quantized else []
    quantized_names = {n for n, _, _ in quantized}
    # Fused experts are quantized by qlora_cli.model.experts, in 4 bits only (8-bit leaves them as loaded).
    experts = [(e * o * i, o) for n, e, o, i in shape.experts
               if s.quant in ("nf4", "fp4") and not skipped(n, s.skip_modules)]
    kept = sum(shape.other_params.values()) + sum(i * o for n, i, o in shape.linears if n not in quantized_names)
    kept += shape.expert_params - sum(numel for numel, _ in experts)
    items = []
    if quantized:
        qbytes = sum(quantized_linear_bytes(i * o, o, s.quant, s.double_quant) for _, i, o in quantized)
        qbytes += sum(quantized_linear_bytes(numel, o, s.quant, s.double_quant) for numel, o in experts)
        label = "8-bit" if s.quant == "int8" else f"4-bit {s.quant}" + (" + double quant" if s.double_quant else "")
        params = sum(i * o for _, i, o in quantized) + sum(numel for numel, _ in experts)
        items.append(MemoryItem(f"base weights ({label})", qbytes, f"{params:,} params"))
    outside = sum(numel for name, numel in _param_numels(shape) if skipped(name, shape.outside_language_model)
                  and name.rsplit(".", 1)[0] not in quantized_names)
    kept -= outside
    dtype = 'fp32 (model.upcast_to_fp32)' if s.quantized and s.upcast else s.model_dtype
    items.append(MemoryItem("unquantized: embeddings, norms, lm_head", kept * s.residual_bytes + shape.buffer_bytes,
                            f"{kept:,} params in {dtype}"))
    if outside:
        items.append(MemoryItem("unquantized: vision tower and projector", outside * s.residual_bytes,
                                f"{outside:,} params in {dtype}"))
    return items


def _param_numels(shape: ModelShape):
    """(parameter name, numel) of every weight: the Linears' and the others'."""
    yield from ((f"{n}.weight", i * o) for n, i, o in shape.linears)
    yield from shape.other_params.items()


def lora_tensors(shape: ModelShape, s: Settings) -> list[int]:
    """numel of each trainable LoRA tensor (A, B, and DoRA's magnitude vector)."""
    sizes = {n: (i, o) for n, i, o in shape.linears}
    tensors = []
    for name in s.lora_targets:
        i, o = sizes[name]
        tensors += [s.lora_r * i, s.lora_r * o] + ([o] if s.use_dora else [])
    for _, experts, o, i, rank in s.expert_lora:  # peft: A is (experts * rank, in), B is (out, rank * experts)
        tensors += [experts * rank * i, experts * rank * o]
    return tensors


def optimizer_bytes(optim: str, tensors: list[int]) -> int:
    """State bytes of TrainingArguments' optimizer over these trainable tensors."""
    per_param = next((b for key, b in _OPTIMIZER_BYTES if key in optim), 8)
    # torch's Adam/AdamW keep a scalar fp32 `step` tensor per parameter as well.
    steps = 4 * len(tensors) if per_param == 8 and "torch" in optim else 0
    return per_param * sum(tensors) + steps


def layer_activation_bytes(shape: ModelShape, s: Settings, dropout: bool | None = None) -> int:
    """Bytes autograd saves per token in one decoder layer (Mistral/Llama with LoRA).

    Read off the forward pass: each RMSNorm saves its input as fp32 and 1/rms; sdpa saves q, k,
    v, its output (o_proj's input) and an fp32 logsumexp per head; SiLU saves the gate output and
    the product saves both its factors; bitsandbytes' 4-bit matmul saves no input (the base
    weight gets no gradient), but each LoRA A saves its input and each LoRA B its r-wide input.
    With `model.tiled_mlp` a dense MLP saves only its input per token (`mlp_slice_bytes` holds the rest).
    """
    dropout = s.lora_dropout > 0 if dropout is None else dropout
    res, mm = s.residual_bytes, s.matmul_bytes
    attn = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    saved = 2 * (4 * shape.hidden + 4)  # two norms: input cast to fp32 + 1/rms
    saved += _mla_bytes(shape, s) if shape.mla else mm * (2 * attn + 2 * kv) + 4 * shape.heads  # sdpa: q, k, v, out, lse
    if _tiled(shape, s):  # each MLP saves its input; the rest is a slice's (mlp_slice_bytes)
        return saved + res * shape.hidden + _lora_input_bytes(shape, s, dropout, mlp=False)
    moe_layers = shape.moe_layers
    # Averaged over the layers: dense MLPs save SiLU's input and output and up_proj's output.
    saved += (3 * res * shape.intermediate * (shape.layers - moe_layers) + _routed_expert_bytes(shape, s) * moe_layers) \
        // shape.layers
    saved += _lora_input_bytes(shape, s, dropout)
    return saved


def _tiled(shape: ModelShape, s: Settings) -> bool:
    """`model.tiled_mlp` on a dense model (MoE blocks are left whole, so their layers count as untiled)."""
    return s.tiled_mlp and not shape.moe_layers


def _dense_mlp_bytes(shape: ModelShape, s: Settings, dropout: bool) -> int:
    """What a dense MLP saves per token: SiLU's input and output, up_proj's output, its LoRA inputs."""
    return 3 * s.residual_bytes * shape.intermediate + _lora_input_bytes(shape, s, dropout, mlp=True)


def mlp_slice_tokens(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    """Tokens of the slice a tiled MLP recomputes at a time (qlora_cli.model.tiling); 0 untiled."""
    from qlora_cli.model.tiling import slice_tokens

    return batch * min(seq, slice_tokens(shape.hidden)) if _tiled(shape, s) else 0


def mlp_slice_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    """A tiled MLP's backward: one slice's MLP activations, recomputed, at a time."""
    return _dense_mlp_bytes(shape, s, s.lora_dropout > 0) * mlp_slice_tokens(shape, s, batch, seq)


def _mla_bytes(shape: ModelShape, s: Settings) -> int:
    """Multi-head latent attention (Mistral4Attention) per token: the fp32 inputs of its two latent
    norms, then sdpa's q and k (nope + rope per head), v (a view of kv_b_proj's whole output), its
    output and logsumexp."""
    q_rank, kv_rank, nope, rope, v = shape.mla
    norms = (4 * q_rank + 4 if q_rank else 0) + 4 * kv_rank + 4
    return norms + s.matmul_bytes * shape.heads * (2 * (nope + rope) + (nope + v) + v) + 4 * shape.heads


def _routed_expert_bytes(shape: ModelShape, s: Settings) -> int:
    """What one MoE layer's experts save per token (transformers' fused expert loop, e.g.
    MixtralExperts): for each of the `experts_per_token` experts a token is routed to, its copy
    of the token's hidden state, gate_up_proj's output, the SiLU output, the product (down_proj's
    input) and down_proj's output; and the router's fp32 softmax. Only routed experts count."""
    if not shape.experts:
        return 0
    layer = shape.experts[0][0].rsplit(".", 1)[0]
    intermediate = max(i for name, _, _, i in shape.experts if name.startswith(layer))  # down_proj's input
    per_expert = s.matmul_bytes * (2 * shape.hidden + 4 * intermediate)
    experts = shape.experts[0][1]
    router_lora = any(e == 1 for _, e, _, _, _ in s.expert_lora)  # the router's Linear then saves its input
    shared = max((i for n, i, _ in shape.linears if ".shared_experts." in n and n.endswith("down_proj")), default=0)
    return (shape.experts_per_token * per_expert + 4 * experts + (s.residual_bytes * shape.hidden if router_lora else 0)
            + 3 * s.residual_bytes * shared)  # shared experts: a dense MLP beside the routed ones


def expert_weight_bytes(shape: ModelShape, s: Settings) -> int:
    """The dequantized expert tensors one MoE layer keeps for the backward pass: the expert loop
    multiplies by slices of the whole fused tensor, and autograd keeps that tensor (with LoRA folded
    in) for the input's gradient."""
    if not shape.experts:
        return 0
    return s.matmul_bytes * shape.expert_params // shape.moe_layers


def _lora_input_bytes(shape: ModelShape, s: Settings, dropout: bool, mlp: bool | None = None) -> int:
    """What the LoRA matmuls of one layer save per token (`mlp`: only those of the dense MLP, or
    only the others; None: all).

    peft casts a module's input to the LoRA weights' dtype (its bitsandbytes layers leave that to
    CUDA autocast when it is on; CPU autocast they do not see), then autocast casts it to its own:
    each cast makes the module its own copy. Without a cast (or dropout), the modules that read
    one tensor (q/k/v, gate/up) save that same tensor.
    """
    layer0 = [n for n in s.lora_targets if ".layers.0." in f".{n}."]
    if mlp is not None:
        layer0 = [n for n in layer0 if (_input_group(n) in ("mlp", "down") and ".mlp." in f".{n}.") == mlp]
    sizes = {n: i for n, i, _ in shape.linears}
    cuda_autocast = s.autocast_bytes is not None and s.on_gpu
    peft_casts = s.residual_bytes != s.lora_bytes and not (s.quantized and cuda_autocast)
    reaching = s.lora_bytes if peft_casts else s.residual_bytes  # element size after peft's cast
    lora_in = s.autocast_bytes or reaching  # ... and after autocast's: what LoRA A multiplies
    total = s.lora_r * lora_in * len(layer0)  # each LoRA B's input
    if dropout:  # each module its own dropout output + a bool mask
        return total + sum(sizes[n] * (lora_in + 1) for n in layer0)
    if peft_casts or lora_in != reaching:
        return total + sum(sizes[n] * lora_in for n in layer0)
    groups = {_input_group(n) for n in layer0} - {"o_proj"}  # o_proj reads sdpa's saved output
    width = {"attn": shape.hidden, "mlp": shape.hidden, "down": shape.intermediate}
    return total + sum(width.get(g, sizes.get(g, shape.hidden)) * lora_in for g in groups)


def _input_group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp",
            "down_proj": "down", "o_proj": "o_proj"}.get(leaf, name)


# TRL's OffloadActivations keeps up to this many saved tensors on the GPU while their copies to the
# host run (its max_fwd_stash_size), and brings the next one back while the backward uses the last.
OFFLOAD_STASH = 5


def activation_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    """Activations kept for the backward pass of one micro-batch, at their peak, on the device."""
    return _activations(shape, s, batch, seq)[0]


def offloaded_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    """What `training.activation_offloading` keeps in (pinned) CPU memory for one micro-batch: what
    autograd saves outside the checkpointed layers. Each byte crosses PCIe twice per micro-batch."""
    return _activations(shape, s, batch, seq)[1]


def _activations(shape: ModelShape, s: Settings, batch: int, seq: int) -> tuple[int, int]:
    """(bytes on the device at the peak, bytes in CPU memory) of the activations."""
    tokens = batch * seq
    layer = layer_activation_bytes(shape, s) * tokens
    final_norm = ((4 + s.residual_bytes) * shape.hidden + 4) * tokens  # fp32 input, 1/rms, lm_head's input
    working = mlp_slice_bytes(shape, s, batch, seq)  # a tiled MLP's slice, recomputed in its backward
    if s.checkpointing:
        # Each layer keeps only its input; the backward pass recomputes one layer at a time.
        each, working = s.residual_bytes * shape.hidden * tokens, working + layer + expert_weight_bytes(shape, s)
        kept = shape.layers * each
    else:
        kept = shape.layers * layer + shape.moe_layers * expert_weight_bytes(shape, s)
        each = kept // shape.layers
    masks = batch * seq * seq if s.packed_mask else 0
    if s.eager_attention:  # eager attention saves the softmax of the scores in every layer
        masks += (1 if s.checkpointing else shape.layers) * batch * shape.heads * seq * seq * s.matmul_bytes * 2
    if not s.offloading:
        return kept + working + final_norm + masks, 0
    # Offloaded: the layers' saved tensors, the final norm's and the chunked loss's hidden-state
    # gradient go to the host; the device holds the copies in flight (a few layer inputs under
    # checkpointing, two layers' tensors without), and the final norm's when the backward starts.
    in_flight = min(shape.layers, OFFLOAD_STASH) * each if s.checkpointing else 2 * each
    # (The chunked loss's gradient is in the model's dtype; the final norm saves its fp32 input and 1/rms.)
    host = kept + (4 * shape.hidden + 4) * tokens + s.residual_bytes * shape.hidden * tokens
    return in_flight + working + final_norm + masks, host


def logits_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    tokens = batch * seq
    if s.chunked_loss:
        # qlora_cli.model.loss: one chunk of fp32 logits at a time (turned into its own gradient in
        # place) next to its 16-bit form when the matmul is not fp32, plus the gradient of the
        # hidden states it hands back.
        from qlora_cli.model.loss import CHUNK_ELEMENTS

        chunk = min(tokens, max(1, CHUNK_ELEMENTS // shape.vocab))
        per_logit = 4 + (s.matmul_bytes if s.matmul_bytes != 4 else 0)
        if s.log_probs:  # the chunk's softmax beside its log-probs (entropy, gradient)
            per_logit += 4
        return per_logit * chunk * shape.vocab + 4 * tokens * shape.hidden
    # At the start of backward: cross-entropy's saved fp32 log-probs, their gradient, and the
    # logits' gradient -- three fp32 tensors of batch x seq x vocab.
    return 12 * tokens * shape.vocab


def temporary_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    """Short-lived buffers: a dequantized weight in the backward pass, a few hidden-size gradients."""
    largest = max([i * o for _, i, o in shape.layer_linears] + [e * o * i for _, e, o, i in shape.experts], default=0)
    dequantized = largest * s.matmul_bytes if s.quantized else 0
    sliced = mlp_slice_tokens(shape, s, batch, seq)  # a tiled MLP's intermediate gradients are a slice's
    if sliced:
        return dequantized + 4 * s.residual_bytes * (batch * seq * shape.hidden + sliced * shape.intermediate)
    return dequantized + 4 * batch * seq * max(shape.hidden, shape.intermediate) * s.residual_bytes


def memory_items(shape: ModelShape, s: Settings, batch: int, seq: int) -> list[MemoryItem]:
    """Every item of one device's memory for one micro-batch of `batch` rows of `seq` tokens."""
    tensors = lora_tensors(shape, s)
    lora = s.lora_bytes * sum(tensors)
    dtype = "fp32" if s.lora_bytes == 4 else s.model_dtype
    items = weight_items(shape, s)
    items += [
        MemoryItem("LoRA parameters", lora, f"{sum(tensors):,} params, r={s.lora_r}, {len(s.lora_targets)} modules, {dtype}"),
        MemoryItem("LoRA gradients", lora, dtype),
        MemoryItem(f"optimizer state ({s.optim})", optimizer_bytes(s.optim, tensors), _optim_how(s.optim)),
    ]
    if s.shards > 1:
        items = _sharded(items, shape, s)
    items += [
        MemoryItem("activations", activation_bytes(shape, s, batch, seq), _activations_how(shape, s, batch, seq)),
        MemoryItem("logits", logits_bytes(shape, s, batch, seq),
                   "one fp32 chunk at a time (model.chunked_loss)" if s.chunked_loss
                   else f"3 fp32 copies of {batch} x {seq:,} x {shape.vocab:,}"),
        MemoryItem("temporaries", temporary_bytes(shape, s, batch, seq), "dequantized weight, hidden-state gradients"),
    ]
    vision = vision_tower_bytes(shape, s, batch)
    if vision:
        kept = "LoRA: every layer kept" if _vision_trained(shape, s) else "frozen: one layer at a time"
        items.append(MemoryItem("vision tower activations", vision, f"{batch} x {s.image_patches:,} patches, {kept} "
                                f"+ the images' block attention mask ({batch * s.image_patches:,}^2)"))
    if s.on_gpu:
        items.append(MemoryItem("CUDA context", CUDA_CONTEXT_BYTES, "0.5-1 GiB: context, cuBLAS workspace"))
    return items


def vision_tower_bytes(shape: ModelShape, s: Settings, batch: int) -> int:
    """The Pixtral tower's forward over one micro-batch's images (`s.image_patches` per row).

    The tower runs every image of the batch as one sequence of patches under a block-diagonal
    attention mask in its dtype (patches^2). Frozen (no LoRA in it), autograd saves none of its
    activations: the peak is one layer's, whose MLP dominates when intermediate >= 2 x hidden (as
    Pixtral's 4x): its input, norm, gate, up and their product, 3 x intermediate + 6 x hidden per
    patch (tests/test_plan.py measures a tiny one). With LoRA
    in the tower, every layer keeps about that much for the backward pass."""
    vision = getattr(shape.config, "vision_config", None)
    if not s.image_patches or vision is None:
        return 0
    patches = batch * s.image_patches
    per_patch = (3 * vision.intermediate_size + 6 * vision.hidden_size) * s.residual_bytes
    layers = vision.num_hidden_layers if _vision_trained(shape, s) else 1
    return layers * patches * per_patch + patches * patches * s.residual_bytes


def _vision_trained(shape: ModelShape, s: Settings) -> bool:
    return any(skipped(name, shape.outside_language_model) for name in s.lora_targets)


def _activations_how(shape: ModelShape, s: Settings, batch: int, seq: int) -> str:
    how = f"{batch} x {seq:,} tokens, checkpointing {'on' if s.checkpointing else 'off'}"
    if 0 < mlp_slice_tokens(shape, s, 1, seq) < seq:  # 0: untiled
        how += f", MLP in slices of {mlp_slice_tokens(shape, s, 1, seq):,} tokens"
    if s.offloading:
        how += f", {offloaded_bytes(shape, s, batch, seq) / GiB:.1f} GiB offloaded to CPU memory"
    return how


def sampling_kv_item(shape: ModelShape, s: Settings, sequences: int, seq: int) -> MemoryItem:
    """GRPO's sampling: generate() keeps every layer's keys and values for `sequences` rows of up to
    `seq` tokens (multi-head latent attention caches each head's keys and values expanded)."""
    q_rank, kv_rank, nope, rope, v = shape.mla or (0, 0, 0, 0, 0)
    per_token = shape.heads * (nope + rope + v) if shape.mla else 2 * shape.kv_heads * shape.head_dim
    return MemoryItem("KV cache while sampling", s.matmul_bytes * shape.layers * per_token * sequences * seq,
                      f"{sequences} completions x {seq:,} tokens, counted beside the step (an upper bound)")


def _sharded(items: list[MemoryItem], shape: ModelShape, s: Settings) -> list[MemoryItem]:
    """FSDP2 (torch's `fully_shard` in the units accelerate makes) keeps 1/shards of every weight,
    gradient and optimizer state on each GPU, and gathers a unit whole while it computes. torch
    keeps a unit's all-gather buffer (a second whole copy) until the next unit's gather in the
    forward, or until the model's forward returns; in the backward it frees it at once and gathers
    the next unit ahead. What is whole at once is the most of:

    - at the loss: the output unit (final norm, lm_head; accelerate gives it
      reshard_after_forward=False, so it stays from its forward through its backward) and its buffer;
    - in the lm_head's backward: the output unit and the last decoder layer, gathered ahead;
    - in a decoder layer: two layers (itself and its buffer forward, or the next one backward).

    The embeddings are whole only while they run, at the start of the forward: counted in none.
    Measured on two CPU ranks (tests/test_distributed.py, bench/fsdp_rank_memory.py)."""
    weights = sum(item.bytes for item in items[:-3])  # weight_items: base and unquantized
    lm_head = next((i * o for n, i, o in shape.linears if n == shape.output_linear), 0)
    root = (sum(shape.other_params.values()) + lm_head) * s.residual_bytes  # (and the layers' norms: small)
    layer = (weights - root) / max(shape.layers, 1)
    output_unit = (lm_head + shape.hidden) * s.residual_bytes
    kept = [MemoryItem(item.name, math.ceil(item.bytes / s.shards), f"{item.how}; 1/{s.shards} per GPU (FSDP)")
            for item in items]
    gathered = max(2 * output_unit, output_unit + layer, 2 * layer)
    what = "lm_head and final norm twice (whole and its all-gather buffer, at the loss)" \
        if gathered == 2 * output_unit else "2 decoder layers whole" if gathered == 2 * layer \
        else "lm_head, final norm and a decoder layer whole"
    return kept + [MemoryItem("FSDP gathered weights", math.ceil(gathered), f"{what}: the most FSDP holds at once")]


def _optim_how(optim: str) -> str:
    per_param = next((b for key, b in _OPTIMIZER_BYTES if key in optim), 8)
    return f"{per_param} bytes/param" + (", paged: may spill to CPU" if "paged" in optim else "")


def total_bytes(shape: ModelShape, s: Settings, batch: int, seq: int) -> int:
    return sum(item.bytes for item in memory_items(shape, s, batch, seq))


def largest_fitting(capacity: int, fits_at) -> int | None:
    """The largest n in 1..capacity for which fits_at(n) holds (monotone), or None."""
    if not fits_at(1):
        return None
    low, high = 1, capacity
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits_at(mid) else (low, mid - 1)
    return low


def flops_per_token(shape: ModelShape, s: Settings, mean_context: float) -> float:
    """Training FLOPs per token: forward 2N, backward ~2N (no base-weight gradients), attention
    4*L*heads*head_dim*context forward and twice that backward, and a second forward under
    activation checkpointing."""
    targets = set(s.lora_targets)
    lora = s.lora_r * sum(i + o for name, i, o in shape.linears if name in targets)
    n = sum(i * o for _, i, o in shape.linears) + lora
    attention = 4 * shape.layers * shape.heads * shape.head_dim * mean_context
    forward = 2 * n + attention
    backward = 2 * n + 2 * attention
    return forward + backward + (forward if s.checkpointing else 0)
