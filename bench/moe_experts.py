"""A tiny Mixtral with its experts in 4 bits (qlora_cli.model.experts) against the same model with
unquantized (here fp32) experts (`llm_int8_skip_modules: [experts, lm_head]`), in one run: expert weight bytes,
peak process memory and trained tokens per second, and their ratios.

Each variant trains in its own subprocess (so `ru_maxrss` is that variant's peak): the same
fp32 model, seed, LoRA (all-linear, experts included) and random token rows.

    QLORA_CACHE=/tmp/qc python bench/moe_experts.py [--steps 8] [--seq 256]

`--load` measures loading instead: the peak anonymous memory (RssAnon, sampled every millisecond,
less what the process held before the load) while `load_base_model` loads a larger Mixtral from
its safetensors folder (LOAD_MODEL: 8 layers, 8 experts of 1024 x 1024, 805 MB of fp32 experts),
4-bit against unquantized (fp32) experts. The checkpoint's pages that safetensors maps are not
anonymous, so they do not count: what counts is what loading itself allocates.

    QLORA_CACHE=/tmp/qc python bench/moe_experts.py --load
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODEL = [  # 2 layers, 256 wide, 8 experts of 512, 2 per token; fp32 (CPU bf16 kernels are slow)
    "model.init_from_config.model_type=mixtral",
    "model.init_from_config.hidden_size=256",
    "model.init_from_config.intermediate_size=512",
    "model.init_from_config.num_hidden_layers=2",
    "model.init_from_config.num_attention_heads=8",
    "model.init_from_config.num_key_value_heads=2",
    "model.init_from_config.num_local_experts=8",
    "model.init_from_config.num_experts_per_tok=2",
    "lora.r=8",
    "lora.lora_alpha=16",
    "training.activation_checkpointing=true",
]
SIXTEEN_BIT = ["quantization.llm_int8_skip_modules=[experts,lm_head]"]
LOAD_MODEL = [  # 8 layers, 1024 wide, 8 experts of 1024: 8 x 8 x 3 x 1024 x 1024 x 4 bytes of experts
    "model.init_from_config.model_type=mixtral",
    "model.init_from_config.hidden_size=1024",
    "model.init_from_config.intermediate_size=1024",
    "model.init_from_config.num_hidden_layers=8",
    "model.init_from_config.num_attention_heads=8",
    "model.init_from_config.num_key_value_heads=2",
    "model.init_from_config.num_local_experts=8",
    "model.init_from_config.num_experts_per_tok=2",
]


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def load_variant(sixteen_bit: bool) -> dict:
    import threading

    from qlora_cli.model.experts import expert_parameters, is_quantized
    from qlora_cli.model.load import load_base_model, model_path
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(["tiny-mistral"], [*LOAD_MODEL, *(SIXTEEN_BIT if sixteen_bit else [])])
    model_path(recipe)  # built and saved once, before anything is measured
    before, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model = load_base_model(recipe)
    done.set()
    sampler.join()
    experts = expert_parameters(model, ("mlp.experts",))
    return {"load_peak_bytes": max(peak[0], rss_anon()) - before, "after_load_bytes": rss_anon() - before,
            "quantized": sum(is_quantized(m, p) for _, m, p in experts), "expert_tensors": len(experts)}


def run_variant(sixteen_bit: bool, steps: int, seq: int) -> dict:
    import torch

    from qlora_cli.model.experts import expert_parameters, is_quantized, quantized_tensors
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(["tiny-mistral"], [*MODEL, *(SIXTEEN_BIT if sixteen_bit else [])])
    model = load_trainable_model(recipe)
    experts = expert_parameters(model, ("mlp.experts",))
    stored = sum(sum(t.numel() * t.element_size() for t in quantized_tensors(m, p)) if is_quantized(m, p)
                 else getattr(m, p).numel() * getattr(m, p).element_size() for _, m, p in experts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    rows = torch.randint(0, 30000, (steps + 1, 1, seq))
    model.train()
    for index in range(steps + 1):
        if index == 1:
            started = time.perf_counter()  # the first step warms up (allocations, kernels)
        loss = model(input_ids=rows[index], labels=rows[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    elapsed = time.perf_counter() - started
    return {"expert_bytes": stored, "tokens_per_s": steps * seq / elapsed,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variant", choices=["4bit", "16bit"])
    parser.add_argument("--load", action="store_true", help="measure the load peak, not training")
    args = parser.parse_args()
    if args.variant:
        measure = load_variant(args.variant == "16bit") if args.load else run_variant(
            args.variant == "16bit", args.steps, args.seq)
        print(json.dumps(measure))
        return
    if args.load:
        results = {variant: json.loads(subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--load"], capture_output=True, text=True,
            check=True).stdout.strip().splitlines()[-1]) for variant in ("16bit", "4bit")}
        base, ours = results["16bit"], results["4bit"]
        print(f"4-bit expert tensors: {ours['quantized']} of {ours['expert_tensors']}")
        for key, label in [("load_peak_bytes", "load peak (RssAnon)"), ("after_load_bytes", "held after load")]:
            print(f"{label:22s} fp32 experts {base[key]:>14,.0f}   4-bit experts {ours[key]:>14,.0f}   "
                  f"ratio {ours[key] / base[key]:.3f}x")
        return
    results = {}
    for variant in ("16bit", "4bit"):
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                               "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base, ours = results["16bit"], results["4bit"]
    for key, label in [("expert_bytes", "expert weight bytes"), ("peak_rss_bytes", "peak process memory"),
                       ("tokens_per_s", "trained tokens/s")]:
        print(f"{label:22s} fp32 experts {base[key]:>14,.0f}   4-bit experts {ours[key]:>14,.0f}   "
              f"ratio {ours[key] / base[key]:.3f}x")


if __name__ == "__main__":
    main()
