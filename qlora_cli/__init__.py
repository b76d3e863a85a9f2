"""qlora: fine-tune Mistral-family language models with QLoRA, driven by YAML recipes.

Code map, in the order data flows. A module imports only from its own line and the lines above
it, and never in a cycle (tests/test_imports.py holds the code to this map):

    errors, atomic                    a user's mistake (exit 2); write to a temporary path, then rename
    families, experts                 the Mistral architectures: auto class, language model, what stays
                                      16-bit; mixture-of-experts layers in 4 bits
    sections, builders, model_checks  our sections' schemas and values; sections -> library objects; what
                                      transformers would refuse of the model section, asked early
    recipe, explain                   files + overrides -> a layered, validated Recipe; `config explain`
    tokenizer, templates, preference, sources   tokenizers; exact Mistral formats and labels (SFT, preference
                                      pairs); data files -> examples
    packing, prepare                  rows packed with their attention spans; the cached prepare step
    run_folder, preflight             a run's folder; what is checked before a weight loads
    model, loss                       the 4-bit base with LoRA (or a plain one), a trained adapter on its
                                      base; its loss in chunks
    plan_data, plan_memory, plan      will it fit, how long, is the data sound: before a weight loads
    collate, trainer, preference_trainer, launch, train   batches, the Trainer (TRL's for dpo/kto), --nproc
                                      processes: `qlora train`
    merge, generate                   base + adapter -> merged model; prompts -> answers
    scoring, benchmarks, evaluate     `qlora eval`: answers against references; lm-eval tasks; side by side
    render, progress                  what the terminal shows: examples, plans, training and eval progress
    cli, __main__                     the command line: parse, call one function, render
"""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that an optional hub kernel (which needs the network)
# is missing; it falls back to its own kernel, so the message only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
