"""qlora: fine-tune Mistral-family language models with QLoRA, driven by YAML recipes.

The package, in the order data flows: a folder per stage, each with an `__init__.py` that says
what it takes and gives. A module imports only from its own line and the lines above it, and never
in a cycle (tests/test_imports.py holds the code to this map):

    errors, atomic, families   a user's mistake (exit 2); write to a temporary path, then rename;
                               the Mistral architectures (auto class, language model, 16-bit parts)
    hub                        whether the Hugging Face Hub answers; the shipped checkpoints' published shapes
    rewards                    GRPO's reward functions a recipe names: built in, or a user's file.py:function
    recipe/                    files + overrides -> a layered, validated Recipe; `config explain`
    data/                      tokenizers; data files -> exact ids and labels -> packed rows, cached
    run_folder                 a run's folder: layout, lock, checkpoints, what resumes
    model/                     the 4-bit base (4-bit experts) with LoRA, an adapter on its base; the loss
    plan/                      what is checked, and what will fit, before a weight loads
    training/                  the Trainer (TRL's for dpo/kto/grpo), stop and resume, --nproc: `qlora train`
    export/                    base + adapter -> merged model; prompts -> answers; GGUF / Ollama / adapter, engine-checked
    eval/                      base, adapter and merged scored side by side: `qlora eval`
    terminal/                  what a person sees: examples, plans, training and eval progress
    cli, __main__              the command line: parse, call one function, render
"""

from qlora_cli.hub import keep_hub_kernels_off

__version__ = "0.1.0"

# before anything imports bitsandbytes: its CPU backend would fetch and run a kernel from the hub
keep_hub_kernels_off()
