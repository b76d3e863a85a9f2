"""Every exported GGUF checked in llama.cpp on probe prompts from the run's own data.

1. The tokens llama.cpp gives the chat, formatted by the template embedded in the GGUF exactly as
   llama-cpp-python's chat API formats it, equal the ids qlora trained on (prompt and whole chat).
2. Greedy answers: the 16-bit GGUFs must give transformers' tokens on the merged model; each
   quantized type is measured against f16: the share of identical greedy tokens, and the mean
   KL divergence of its next-token distribution from f16's along f16's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_cli.data.sources import read_source
from qlora_cli.data.templates import _parse_turns, encode_chat, encode_prompt

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe

PROBES = 4  # conversations taken from the run's data
MAX_NEW_TOKENS = 24
EXACT_TYPES = ("f32", "f16", "bf16")  # must answer as transformers does


@dataclass
class TypeReport:
    """What the engine did with one GGUF."""

    name: str
    answers: list[list[int]]
    same_tokens: float | None = None  # share of f16's greedy tokens this type repeats
    mean_kl: float | None = None  # nats per token, against f16 along f16's answers


@dataclass
class CheckReport:
    probes: list[list[dict]]
    reference: list[list[int]]  # transformers' greedy answers on the merged model
    types: list[TypeReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what refuses the export


def probe_conversations(recipe: Recipe, count: int = PROBES) -> list[list[dict]]:
    """The first conversations of the run's training data, as chat messages."""
    found = []
    for source in recipe.data.sources:
        for example in read_source(source):
            messages = _text_only(example.messages) if example.messages else _messages_of_text(example.text or "")
            if messages and messages[-1]["role"] == "assistant":
                found.append(messages)
            if len(found) == count:
                return found
    return found


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
            chat = messages[:-1] if generation_prompt else messages
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


def transformers_answers(model_dir: Path, prompts: list[list[int]], eos: int) -> list[list[int]]:
    """Greedy answers of the merged model in transformers, the same way `greedy` takes them."""
    import torch

    from qlora_cli.export.generate import _load_plain_model

    model = _load_plain_model(str(model_dir)).eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids, answer = list(prompt), []
            for _ in range(MAX_NEW_TOKENS):
                token = int(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float().argmax())
                if token == eos:
                    break
                answer.append(token)
                ids.append(token)
            answers.append(answer)
    return answers


def compare(name: str, answers: list[list[int]], f16: TypeReport | None, f16_log_probs, llm, prompts) -> TypeReport:
    """The share of f16's greedy tokens `answers` repeat (position by position), and the mean KL."""
    import numpy as np

    report = TypeReport(name, answers)
    if f16 is None:
        return report
    total = sum(max(len(a), len(b)) for a, b in zip(answers, f16.answers)) or 1
    report.same_tokens = sum(x == y for a, b in zip(answers, f16.answers) for x, y in zip(a, b)) / total
    kls, count = 0.0, 0
    for prompt, reference, reference_log_probs in zip(prompts, f16.answers, f16_log_probs):
        if not reference:
            continue
        log_probs = log_probs_along(llm, prompt, reference)
        kls += float((np.exp(reference_log_probs) * (reference_log_probs - log_probs)).sum())
        count += len(reference)
    report.mean_kl = kls / count if count else None
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
