"""How fast and how lean `qlora train` trains, against the plain recipe and a careful stock one.

    python bench/train_speed.py --config cpu [--examples 2000] [--arms plain,dynamic,qlora]
    python bench/train_speed.py --config gpu [--variant packed]       # needs a CUDA GPU
    python bench/train_speed.py --config cpu --arms qlora --qlora model.chunked_loss=false  # one lever off

Three arms, one after the other, each in its own subprocess (so peak memory does not mix), on the
same model, tokens, LoRA, quantization, optimizer and examples per step:

- plain:   stock transformers + peft + bitsandbytes, every example padded to max_length,
           `DataCollatorForLanguageModeling(mlm=False)` (the seed's recipe);
- dynamic: the same, padded only to the longest example of each batch (the best a careful user
           gets from the stock collator);
- qlora:   `qlora_cli.training.run.train` on a recipe, its defaults on (packing with block-diagonal
           attention, chunked loss).

All arms train on every token (`data.train_on: all`, as DataCollatorForLanguageModeling does),
for the same number of optimizer steps (`--steps`) with the same schedule; packed rows hold
several examples, so qlora takes the number of rows per step nearest batch / examples per row, to
see the same number of examples per step, in micro-batches no larger than the stock arms' (4 x
2,048 on gpu). The stock arms prepare the model as peft documents (`prepare_model_for_kbit_training`:
fp32 embeddings, norms and residual stream); qlora runs its own default (`model.upcast_to_fp32:
false`), so in bf16 the comparison includes that lever too.
Held-out loss is computed the same way for every arm (each held-out example alone, summed
token NLL / tokens), on the adapter the arm produced. On a CPU with AVX512-BF16, bitsandbytes
repacks a 4-bit layer for its bf16 inference kernel at its first no-grad eval-mode forward and
keeps it so: training through a repacked layer computes in bf16 and passes no gradient to the
layer's input. So every evaluation here first turns that repack off (as `qlora train` does for its
own models), and each arm counts the repacked layers at every optimizer step: an arm that trained
through one fails instead of reporting a figure. The last line is `speedup: X.XXx`:
qlora over dynamic, in trained (non-pad) tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("plain", "dynamic", "qlora")
WARMUP_STEPS = 3
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
              "rope_theta": 10000.0, "sliding_window": 4096, "seed": 0}
CONFIGS = {
    # A small Mistral with the real 32k vocabulary: its lm_head is ~85% of the FLOPs (see RESULTS.md).
    "cpu": {"model": {"model_type": "mistral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                      "initializer_range": 0.1, "seed": 0},
            "dtype": "float32", "compute": "float32", "bf16": False, "max_length": 1024, "batch": 8, "micro": 8,
            "lr": 5e-3, "lora_r": 16, "optim": "adamw_torch", "checkpointing": False, "steps": 30},
    "gpu": {"model": MISTRAL_7B, "dtype": "bfloat16", "compute": "bfloat16", "bf16": True, "max_length": 2048,
            "batch": 16, "micro": 4, "lr": 2e-4, "lora_r": 16, "optim": "paged_adamw_8bit", "checkpointing": True,
            "steps": 10},  # plain: 10 x 16 x 2,048 tokens; a device session has 15 minutes in all
}
N_7B = 7.24e9


# ---------------------------------------------------------------- data and recipe (parent process)


def one_token_words(tokenizer, count: int = 4000) -> list[str]:
    """Lower-case words that the tokenizer encodes as a single piece, so lengths come out as asked."""
    words = []
    for piece in sorted(tokenizer.get_vocab()):
        word = piece[1:]
        if piece.startswith("\u2581") and word.isalpha() and word.islower() and 3 <= len(word) <= 8:
            words.append(word)
    return random.Random(0).sample(words, min(count, len(words)))


def synthetic_examples(count: int, low: int, high: int, words: list[str], full: bool, seed: int = 0) -> list[str]:
    """Seed-format texts whose token lengths spread log-uniformly over [low, high] (or all `high`)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        tokens = high if full else int(math.exp(rng.uniform(math.log(low), math.log(high))))
        body = max(2, tokens - 12)  # <s>, [INST], [/INST] and </s> take about a dozen tokens in v1
        question = max(1, body // 4)
        ask = " ".join(rng.choices(words, k=question))
        say = " ".join(rng.choices(words, k=body - question))
        texts.append(f"<s>[INST] {ask} [/INST] {say}</s>")
    return texts


def write_recipe(folder: Path, config: dict, args) -> Path:
    """The qlora arm's recipe; the stock arms read the same values from it."""
    import yaml

    model = {"name_or_path": None, "init_from_config": config["model"], "tokenizer": args.tokenizer,
             "dtype": config["dtype"], "attn_implementation": "sdpa"}
    if args.model_dir:
        model.update(name_or_path=args.model_dir, init_from_config=None)
    recipe = {
        "extends": "mistral7b",
        "model": model,
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                         "bnb_4bit_compute_dtype": config["compute"]},
        "lora": {"r": config["lora_r"], "lora_alpha": 2 * config["lora_r"], "lora_dropout": 0.0,
                 "target_modules": "all-linear"},
        "data": {"sources": [{"path": str(folder / "train.jsonl"), "format": "text"}], "train_on": "all",
                 "max_length": config["max_length"], "packing": True, "prepared_dir": str(folder / "prepared")},
        "training": {"output_dir": str(folder / "run-qlora"), "max_steps": args.steps or config["steps"],
                     "per_device_train_batch_size": config["micro"],
                     "gradient_accumulation_steps": config["batch"] // config["micro"],
                     "learning_rate": config["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 0.05,
                     "optim": config["optim"], "bf16": config["bf16"],
                     "activation_checkpointing": config["checkpointing"], "logging_steps": 10,
                     "save_strategy": "no", "report_to": "none", "seed": 42},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare_everything(folder: Path, config: dict, args) -> dict:
    """Data files, recipe, the built model and both prepared datasets (cached for the arms)."""
    from qlora_cli.model.load import model_path
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.recipe.load import load_recipe

    folder.mkdir(parents=True, exist_ok=True)
    recipe_path = write_recipe(folder, config, args)
    recipe = load_recipe([str(recipe_path)], [])
    tokenizer = load_recipe_tokenizer(recipe)
    texts = synthetic_examples(args.examples, 16, config["max_length"], one_token_words(tokenizer),
                               full=args.variant == "packed")
    held_out = max(1, args.examples // 20)
    for name, rows in (("heldout.jsonl", texts[:held_out]), ("train.jsonl", texts[held_out:])):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    if args.config == "gpu" and not args.model_dir:
        args.model_dir = str(build_model_on_gpu(folder, config["model"], tokenizer))
        recipe_path = write_recipe(folder, config, args)
        recipe = load_recipe([str(recipe_path)], [])
    model_path(recipe)  # builds and caches an init_from_config model once, outside the timed arms
    packed = prepare_dataset(recipe, tokenizer).summary
    unpacked = prepare_dataset(load_recipe([str(recipe_path)], ["data.packing=false"]), tokenizer).summary
    prepare_dataset(load_recipe([str(recipe_path)], ["data.packing=false",
                                                     f"data.sources.0.path={folder / 'heldout.jsonl'}"]), tokenizer)
    examples_per_row = packed.examples["train"] / packed.rows["train"]
    micro, accumulation = rows_per_step(config["batch"] / examples_per_row, config["micro"])
    return {"recipe": str(recipe_path), "micro_rows": micro, "accumulation": accumulation,
            "examples_per_row": examples_per_row,
            "packing_efficiency": packed.packing_efficiency, "train_examples": unpacked.examples["train"],
            "train_tokens": unpacked.tokens["train"], "held_out": held_out,
            "p50": unpacked.length_percentiles["p50"], "max": unpacked.length_percentiles["max"]}


def rows_per_step(target: float, most: int) -> tuple[int, int]:
    """(rows per micro-batch <= most, micro-batches per step) whose product is nearest `target`
    rows: the same examples per step as the stock arms, in micro-batches no larger than theirs."""
    pairs = [(m, a) for a in range(1, math.ceil(target) + 1) for m in range(1, most + 1)]
    return min(pairs, key=lambda p: (abs(p[0] * p[1] - max(target, 1)), p[1]))


def build_model_on_gpu(folder: Path, init: dict, tokenizer) -> Path:
    """Random Mistral-7B weights, made on the GPU in bf16 (minutes less than on the CPU), saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = folder / "mistral-7b-random"
    if (target / "config.json").is_file():
        return target
    init = {k: v for k, v in init.items() if k != "seed"}
    config = AutoConfig.for_model(init.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **init)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


# ---------------------------------------------------------------- measuring (arm processes)


class StepMeter:
    """Per optimizer step: wall time, trained tokens and processed (padded) tokens.

    Collators push (real, processed) per micro-batch into a FIFO; each step takes its own
    micro-batches from the front, so the DataLoader's look-ahead does not shift the counts.
    """

    def __init__(self, micro_batches_per_step: int):
        from collections import deque

        self.queue, self.per_step = deque(), micro_batches_per_step
        self.steps: list[tuple[float, int, int]] = []
        self.began = self.ended = self.last = None
        self.repacked = 0  # the most 4-bit layers found repacked at any step end

    def record(self, real: int, processed: int) -> None:
        self.queue.append((real, processed))

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Meter(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.began = meter.last = _sync_time()

            def on_step_end(self, args, state, control, **kwargs):
                now = _sync_time()
                batches = [meter.queue.popleft() for _ in range(min(meter.per_step, len(meter.queue)))]
                meter.steps.append((now - meter.last, sum(b[0] for b in batches), sum(b[1] for b in batches)))
                meter.last = now
                meter.repacked = max(meter.repacked, repacked_layers(kwargs["model"]))

            def on_train_end(self, args, state, control, **kwargs):
                meter.ended = _sync_time()

        return Meter()

    def summary(self) -> dict:
        timed = self.steps[WARMUP_STEPS:] or self.steps
        real = sum(s[1] for s in self.steps)
        return {
            "steps": len(self.steps),
            "tokens_per_second": statistics.median(s[1] / s[0] for s in timed),
            "real_tokens": real,
            "processed_tokens": sum(s[2] for s in self.steps),
            "wall_s": self.ended - self.began,
            "repacked_layers": self.repacked,
        }


def repacked_layers(model) -> int:
    """4-bit layers bitsandbytes has repacked for its CPU bf16 inference kernel (no input gradient)."""
    return sum(bool(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False))
               for m in model.modules())


def keep_training_kernel(model) -> None:
    """Turn off bitsandbytes' repack-at-first-eval-forward, so evaluating does not change how the
    arm trains afterwards, and every arm's loss comes from the same kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _sync_time() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def held_out_loss(model, rows) -> float:
    """Summed token NLL / labelled tokens over the held-out examples, each alone (no padding)."""
    import torch

    keep_training_kernel(model)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            labels = torch.tensor(row["labels"][1:], device=model.device)
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / max(count, 1)


def unpacked_rows(recipe_path: str, source: str | None = None):
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.recipe.load import load_recipe

    overrides = ["data.packing=false"] + ([f"data.sources.0.path={source}"] if source else [])
    recipe = load_recipe([recipe_path], overrides)
    return recipe, prepare_dataset(recipe, load_recipe_tokenizer(recipe)).dataset["train"]


def run_stock_arm(arm: str, plan: dict, folder: Path) -> dict:
    """plain / dynamic: transformers + peft + bitsandbytes as their documentation shows."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from qlora_cli.model.load import model_path
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    recipe, train_rows = unpacked_rows(plan["recipe"])
    tokenizer = load_recipe_tokenizer(recipe)
    # the baseline arm builds its own objects from the recipe's keys as written
    q, training, max_length = recipe.written("quantization"), recipe.written("training"), recipe.data.max_length
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
                             bnb_4bit_use_double_quant=q["bnb_4bit_use_double_quant"],
                             bnb_4bit_compute_dtype=getattr(torch, q["bnb_4bit_compute_dtype"]))
    model = AutoModelForCausalLM.from_pretrained(
        model_path(recipe), quantization_config=bnb, dtype=getattr(torch, recipe.model.dtype),
        attn_implementation="sdpa", device_map={"": 0} if torch.cuda.is_available() else None)
    checkpointing = bool(training["activation_checkpointing"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(training["seed"])  # the same LoRA initialisation as the qlora arm
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.written("lora")))
    _, held = unpacked_rows(plan["recipe"], str(folder / "heldout.jsonl"))
    before = held_out_loss(model, held)
    model.train()

    columns = {"input_ids": [list(ids) for ids in train_rows["input_ids"]]}
    if arm == "plain":  # every example padded to max_length up front, as the seed did
        columns = tokenizer.pad(columns, padding="max_length", max_length=max_length)
        columns = {k: [list(v) for v in vs] for k, vs in columns.items()}
    from datasets import Dataset

    dataset = Dataset.from_dict(dict(columns))
    steps_micro = training["gradient_accumulation_steps"]
    meter = StepMeter(steps_micro)
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting_collate(features):
        batch = collate(features)
        meter.record(int(batch["attention_mask"].sum()), batch["input_ids"].numel())
        return batch

    args = TrainingArguments(
        output_dir=str(folder / f"run-{arm}"), max_steps=training["max_steps"], per_device_train_batch_size=training[
            "per_device_train_batch_size"], gradient_accumulation_steps=steps_micro,
        learning_rate=training["learning_rate"], lr_scheduler_type=training["lr_scheduler_type"],
        warmup_steps=training["warmup_steps"], optim=training["optim"], bf16=training["bf16"],
        logging_steps=training["logging_steps"], save_strategy="no", report_to="none", seed=training["seed"],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collate,
                      callbacks=[meter.callback()])
    trainer.train()
    peak = peak_memory_bytes()
    return {**meter.summary(), "peak_bytes": peak, "held_out_loss": held_out_loss(trainer.model, held),
            "held_out_loss_before": before}


def run_qlora_arm(plan: dict, folder: Path, overrides: list[str]) -> dict:
    """`qlora train` itself, through its Python entry point, with the recipe's defaults."""
    import qlora_cli.training.trainer as qlora_trainer
    from qlora_cli.model.load import load_adapter_model
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.training.run import train

    recipe = load_recipe([plan["recipe"]], [f"training.per_device_train_batch_size={plan['micro_rows']}",
                                            f"training.gradient_accumulation_steps={plan['accumulation']}",
                                            *overrides])
    meter = StepMeter(recipe.training.gradient_accumulation_steps)

    class MeteredCollator(qlora_trainer.CountingCollator):  # counts what the real collator makes
        def __call__(self, rows):
            batch = super().__call__(rows)
            meter.record(batch[qlora_trainer.TOKENS_KEY], batch["input_ids"].numel())
            return batch

    qlora_trainer.CountingCollator = MeteredCollator  # training.run.build_trainer imports it at call time
    result = train(recipe, overwrite=True, reporter=_Reporter(meter))
    peak = peak_memory_bytes()
    rows, seq = recipe.training.per_device_train_batch_size, recipe.data.max_length
    model = load_adapter_model(recipe, result.run.adapter, quantized=True)
    _, held = unpacked_rows(plan["recipe"], str(folder / "heldout.jsonl"))
    return {**meter.summary(), "peak_bytes": peak, "held_out_loss": held_out_loss(model, held),
            "plan": {"rows": rows, "seq": seq, "bytes": plan_estimate(recipe, rows, seq)}}


def plan_estimate(recipe, rows: int, seq: int) -> int:
    """What `qlora plan` says this arm's recipe needs per device at rows x seq tokens."""
    import torch

    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.plan.estimate import load_model_config, recipe_settings
    from qlora_cli.plan.memory import model_shape, total_bytes

    shape = model_shape(load_model_config(recipe, load_recipe_tokenizer(recipe)))
    return total_bytes(shape, recipe_settings(recipe, shape, on_gpu=torch.cuda.is_available()), rows, seq)


class _Reporter:
    """The reporter interface `train` calls; here it only adds the step meter."""

    def __init__(self, meter: StepMeter):
        self.meter = meter

    def plan_ready(self, plan):
        pass

    def note(self, text):
        pass

    def data_ready(self, prepared):
        pass

    def model_ready(self, summary, run):
        pass

    def training_callback(self, tokens_seen):
        return self.meter.callback()


# ---------------------------------------------------------------- the GPU's own rate, for MFU


def bf16_matmul_flops(size: int = 8192, repeats: int = 50) -> float:
    """Measured dense bf16 matmul FLOP/s of this GPU: the denominator of MFU."""
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_token(plan: dict, config: dict) -> float:
    """4N (forward 2N, backward 2N: input gradients only, the base is frozen) plus attention
    (QK^T and AV over the causal context, forward + 2x for backward)."""
    m = config["model"]
    mean_context = plan["mean_context"]
    attention = 3 * 4 * m["num_hidden_layers"] * m["hidden_size"] * mean_context
    return 4 * N_7B + attention


# ---------------------------------------------------------------- table


def render(results: dict, plan: dict, args, extra: list[str]) -> str:
    gib = 2**30
    head = (f"| arm     | trained tok/s | non-pad share | wall s | peak {'GPU reserved' if args.config == 'gpu' else 'RSS'} GiB "
            f"| held-out loss | vs plain | vs dynamic |")
    lines = [head, "|---------|--------------:|--------------:|-------:|----------:|--------------:|---------:|-----------:|"]
    for arm, r in results.items():
        share = r["real_tokens"] / max(r["processed_tokens"], 1)
        ratio = {b: (f"{r['tokens_per_second'] / results[b]['tokens_per_second']:.2f}x" if b in results else "-")
                 for b in ("plain", "dynamic")}
        lines.append(f"| {arm:<7} | {r['tokens_per_second']:>13,.0f} | {100 * share:>12.1f}% | {r['wall_s']:>6.1f} "
                     f"| {r['peak_bytes'] / gib:>9.3f} | {r['held_out_loss']:>13.4f} | {ratio['plain']:>8} "
                     f"| {ratio['dynamic']:>10} |")
    before = [r["held_out_loss_before"] for r in results.values() if "held_out_loss_before" in r]
    if before:
        lines.append(f"held-out loss before training: {before[0]:.4f}")
    lines.append("4-bit layers repacked while training: "
                 + ", ".join(f"{arm} {r.get('repacked_layers', '?')}" for arm, r in results.items()))
    lines += extra
    if "plan" in results.get("qlora", {}):
        q, estimate = results["qlora"], results["qlora"]["plan"]
        measured = "torch.cuda.max_memory_reserved" if args.config == "gpu" else "peak RSS (the whole Python process)"
        lines.append(f"qlora plan at {estimate['rows']} x {estimate['seq']:,}: {estimate['bytes'] / gib:.2f} GiB; "
                     f"{measured}: {q['peak_bytes'] / gib:.2f} GiB (estimate/measured {estimate['bytes'] / q['peak_bytes']:.2f})")
    if "qlora" in results and "dynamic" in results:
        q, d = results["qlora"], results["dynamic"]
        lines.append(f"peak memory qlora/dynamic: {q['peak_bytes'] / d['peak_bytes']:.3f}; held-out loss qlora/dynamic: "
                     f"{q['held_out_loss'] / d['held_out_loss']:.4f}")
        lines.append(f"speedup: {q['tokens_per_second'] / d['tokens_per_second']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--variant", choices=["spread", "packed"], default="spread",
                        help="packed: every example is max_length tokens long, for all arms")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default: 30 cpu, 10 gpu)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--qlora", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the qlora arm")
    parser.add_argument("--model-dir", help="a saved base model to use instead of init_from_config")
    parser.add_argument("--tokenizer", default="mistral-common:v1",
                        help="model.tokenizer: a folder where mistral-common is not installed")
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    args = parser.parse_args()
    if args.arm:
        plan = json.loads(Path(args.workdir, "plan.json").read_text())
        folder = Path(args.workdir)
        result = run_qlora_arm(plan, folder, args.qlora) if args.arm == "qlora" else run_stock_arm(args.arm, plan, folder)
        if result["repacked_layers"]:
            sys.exit(f"arm {args.arm} trained through {result['repacked_layers']} repacked 4-bit layers "
                     "(bitsandbytes' bf16 inference kernel, no input gradient): its figures would be wrong")
        print("RESULT " + json.dumps(result))
        return
    config = CONFIGS[args.config]
    if args.config == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--config gpu needs a CUDA GPU; this machine has none")
    import tempfile

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="train-speed-"))
    os.environ.setdefault("QLORA_CACHE", str(folder / "cache"))
    plan = prepare_everything(folder, config, args)
    plan["mean_context"] = _mean_context(folder / "train.jsonl", plan)
    (folder / "plan.json").write_text(json.dumps(plan))
    print(f"data: {plan['train_examples']} train examples ({plan['train_tokens']:,} tokens, p50 {plan['p50']}, "
          f"max {plan['max']}), {plan['held_out']} held out; packing {100 * plan['packing_efficiency']:.1f}% full, "
          f"{plan['examples_per_row']:.2f} examples/row -> qlora {plan['micro_rows']} x {plan['accumulation']} rows/step vs "
          f"{config['batch']} examples/step", flush=True)
    results = {}
    for arm in args.arms.split(","):
        command = [sys.executable, __file__, "--config", args.config, "--arm", arm, "--workdir", str(folder),
                   "--qlora", *args.qlora]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"arm {arm} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        results[arm] = json.loads(lines[-1][len("RESULT "):])
        print(f"{arm}: done in {time.perf_counter() - started:.0f} s", flush=True)
    extra = []
    if args.config == "gpu":
        rate = bf16_matmul_flops()
        per_token = flops_per_token(plan, config)
        extra.append(f"bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s; MFU (4N + attention per trained token): "
                     + ", ".join(f"{arm} {100 * per_token * r['tokens_per_second'] / rate:.1f}%"
                                 for arm, r in results.items()))
    print(render(results, plan, args, extra))


def _mean_context(path: Path, plan: dict) -> float:
    """Mean causal context per token, from the example lengths (approximate: words ~ tokens)."""
    total = count = 0
    for line in path.read_text().splitlines():
        n = len(json.loads(line)["text"].split()) + 8
        total += n * (n + 1) / 2
        count += n
    return total / max(count, 1)


if __name__ == "__main__":
    main()
