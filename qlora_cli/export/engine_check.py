"""Every exported GGUF checked in llama.cpp on probe prompts from the run's own data.

1. The tokens llama.cpp gives the chat, formatted by the template embedded in the GGUF exactly as
   llama-cpp-python's chat API formats it, equal the ids qlora trained on (prompt and whole chat).
2. Answers: along transformers' greedy answers on the merged model, each 16-bit GGUF's
   next-token distribution must stay within `ENGINE_KL_LIMIT` of transformers' (a converter that
   maps a tensor wrongly is far above it; bf16 weights computed in f16 on another engine are far
   below it, and an exact-token rule would refuse a near-tie there). Each quantized type is
   measured against f16: the share of identical greedy tokens, and the mean KL divergence of its
   next-token distribution from f16's along f16's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.data.templates import _parse_turns, encode_chat, encode_prompt

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

PROBES = 4  # conversations taken from the run's data
MAX_NEW_TOKENS = 24
EXACT_TYPES = ("f32", "f16", "bf16")  # must answer as transformers does
ENGINE_KL_LIMIT = 0.02  # nats per token, a 16-bit GGUF against transformers along its answers


@dataclass
class TypeReport:
    """What the engine did with one GGUF."""

    name: str
    answers: list[list[int]]
    kl_vs_transformers: float | None = None  # 16-bit types: nats per token along transformers' answers
    same_tokens: float | None = None  # share of f16's greedy tokens this type repeats
    mean_kl: float | None = None  # nats per token, against f16 along f16's answers


@dataclass
class CheckReport:
    probes: list[list[dict]]
    reference: list[list[int]]  # transformers' greedy answers on the merged model
    reference_log_probs: list = field(default_factory=list)  # transformers' log-softmax along them
    types: list[TypeReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what refuses the export


def probe_conversations(recipe: Recipe, count: int = PROBES) -> list[list[dict]]:
    """The first conversations of the run's training data, as chat messages: a chat ends with its
    answer (a preference row with its chosen answer); a prompt row (GRPO) has none."""
    from qlora_cli.data.sources import read_rows, to_example

    found = []
    for source in recipe.data.sources:
        for where, row in read_rows(source):
            messages = _text_only(_messages_of(to_example(row, where, source)))
            if messages and messages[-1]["role"] in ("assistant", "user"):
                found.append(messages)
            if len(found) == count:
                return found
    return found


def _messages_of(example) -> list[dict]:
    if hasattr(example, "chosen"):  # a preference pair or a signed example
        return [*example.prompt, *example.chosen]
    if getattr(example, "messages", None):  # a chat, or a prompt row
        return example.messages
    return _messages_of_text(getattr(example, "text", None) or "") or []


def prompt_of(messages: list[dict]) -> list[dict]:
    """What the model is asked: the conversation without its answer."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def _text_only(messages: list[dict]) -> list[dict]:
    """The conversation with its images left out: the GGUF is checked on text (the projector is
    loaded, not run; llama-cpp-python's chat API takes images through a separate handler)."""
    def text(content) -> str:
        if isinstance(content, str):
            return content
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text").strip()

    return [{"role": m["role"], "content": text(m["content"])} for m in messages]


def _messages_of_text(text: str) -> list[dict] | None:
    turns = _parse_turns(text)
    if turns is None:
        return None
    messages = []
    for _, question, answer in turns:
        messages += [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
    return messages


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def template_problems(llm, probes: list[list[dict]], tokenizer, template: str) -> list[str]:
    """Where llama.cpp's tokens for a chat formatted by the GGUF's own template differ from qlora's."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    embedded = llm.metadata.get("tokenizer.chat_template")
    if not embedded:
        return ["the GGUF carries no chat template"]
    if llm.chat_format != "chat_template.default":
        return [f"llama-cpp-python formats chats as {llm.chat_format!r}, not with the GGUF's template"]
    eos, bos = llm.token_eos(), llm.token_bos()
    problems = []
    for generation_prompt in (True, False):
        formatter = Jinja2ChatFormatter(template=embedded, eos_token=llm._model.token_get_text(eos),
                                        bos_token=llm._model.token_get_text(bos), add_generation_prompt=generation_prompt,
                                        stop_token_ids=[eos])
        for messages in probes:
            if not generation_prompt and messages[-1]["role"] != "assistant":
                continue  # a prompt row: no answer to format
            chat = prompt_of(messages) if generation_prompt else messages
            formatted = formatter(messages=chat)
            # As llama-cpp-python's chat completion tokenizes the formatted prompt.
            got = llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
            want = encode_prompt(chat, tokenizer, template) if generation_prompt else encode_chat(chat, tokenizer, template)[0]
            if list(got) != list(want):
                problems.append(f"the GGUF's chat template gives llama.cpp {_show(llm, got)} where qlora trained on "
                                f"{_show(llm, want)}")
    return problems


def _show(llm, ids) -> str:
    text = llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")
    return f"{len(ids)} tokens {text!r}"


def greedy(llm, prompt: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """The most likely next token, over and over, from llama.cpp's own logits (no sampler)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    answer = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == llm.token_eos():
            break
        answer.append(token)
        llm.eval([token])
    return answer


def log_probs_along(llm, prompt: list[int], answer: list[int]):
    """Log-softmax of llama.cpp's next-token logits at each answer position (teacher-forced)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt + answer)
    logits = np.asarray(llm.scores[len(prompt) - 1: len(prompt) + len(answer) - 1], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def transformers_answers(model_dir: Path, prompts: list[list[int]], eos: int) -> tuple[list[list[int]], list]:
    """Greedy answers of the merged model in transformers, the same way `greedy` takes them, and the
    log-softmax of each next-token distribution that chose an answer token (as `log_probs_along`)."""
    import torch

    from qlora_cli.export.generate import _load_plain_model

    model = _load_plain_model(str(model_dir)).eval()
    answers, log_probs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, answer, steps = list(prompt), [], []
            for _ in range(MAX_NEW_TOKENS):
                logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].double()
                token = int(logits.argmax())
                if token == eos:
                    break
                answer.append(token)
                steps.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
                ids.append(token)
            answers.append(answer)
            log_probs.append(steps)
    return answers, log_probs


def mean_kl(reference_log_probs: list, log_probs: list) -> float | None:
    """Mean KL(reference || other) per answer token, over every probe (nats)."""
    import numpy as np

    total, count = 0.0, 0
    for reference, other in zip(reference_log_probs, log_probs):
        if len(reference):
            reference = np.asarray(reference)
            total += float((np.exp(reference) * (reference - other)).sum())
            count += len(reference)
    return total / count if count else None


def against_transformers(report: TypeReport, check: CheckReport, llm, prompts) -> list[str]:
    """A 16-bit GGUF's distance from transformers along transformers' answers; a problem past the limit."""
    along = [log_probs_along(llm, p, a) if a else [] for p, a in zip(prompts, check.reference)]
    report.kl_vs_transformers = mean_kl(check.reference_log_probs, along)
    if report.kl_vs_transformers is not None and report.kl_vs_transformers > ENGINE_KL_LIMIT:
        return [f"{report.name}: llama.cpp's next-token distribution is {report.kl_vs_transformers:.3g} nats per token "
                f"from transformers' on the merged model (the limit is {ENGINE_KL_LIMIT})"]
    return []


def compare(name: str, answers: list[list[int]], f16: TypeReport | None, f16_log_probs, llm, prompts) -> TypeReport:
    """The share of f16's greedy tokens `answers` repeat (position by position), and the mean KL."""
    report = TypeReport(name, answers)
    if f16 is None:
        return report
    total = sum(max(len(a), len(b)) for a, b in zip(answers, f16.answers)) or 1
    report.same_tokens = sum(x == y for a, b in zip(answers, f16.answers) for x, y in zip(a, b)) / total
    along = [log_probs_along(llm, p, a) if a else [] for p, a in zip(prompts, f16.answers)]
    report.mean_kl = mean_kl(f16_log_probs, along)
    return report


def mmproj_problems(llm, mmproj: Path) -> list[str]:
    """Whether llama.cpp's multimodal library (mtmd) loads the vision projector beside the model."""
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    context = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    if context is None:
        return [f"llama.cpp's mtmd cannot load {mmproj.name} beside the model"]
    try:
        return [] if mtmd_cpp.mtmd_support_vision(context) else [f"{mmproj.name} loads but says it has no vision"]
    finally:
        mtmd_cpp.mtmd_free(context)
