"""`qlora generate`: prompts (and images) -> answers from the trained adapter (or a merged / any model).

Prompts are formatted with the recipe's template and tokenizer, exactly as training formatted
the same instruction, so the model sees at inference what it learned from: an image's tokens
and pixels are mistral-common's, made by the same functions as the training batches'.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from qlora_cli.recipe.builders import build_generation_config
from qlora_cli.errors import UserError
from qlora_cli.plan.preflight import MODEL_FIX, check_before_generate
from qlora_cli.run_folder import merge_adapter_dir
from qlora_cli.data.sources import load_json
from qlora_cli.data.templates import check_roles, encode_prompt

if TYPE_CHECKING:
    from qlora_cli.recipe.load import Recipe


@dataclass
class Generator:
    """A loaded model, its tokenizer and how to format and decode for it."""

    model: object
    tokenizer: object
    template: str
    generation_config: object
    system_prompt: str | None = None
    image_settings: object = None  # data.images.ImageSettings of a vision-language model, else None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with a user turn, as training formatted it."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return encode_prompt(messages, self.tokenizer, self.template)

    def image_inputs(self, conversations: list[list[dict]]) -> dict:
        """`pixel_values` and `image_sizes` of the conversations' images in order (as a training
        batch has them), on the model's device; {} when they hold none."""
        from qlora_cli.data.collate import pixel_batch
        from qlora_cli.data.images import images_of

        images = [image.data for messages in conversations for image in images_of(messages)]
        if not images:
            return {}
        if self.image_settings is None:
            raise UserError("the prompt holds an image, and this model sees no images (it has no vision tower)",
                            where="--image", fix="use a vision-language model (mistral3), or drop the images")
        return {key: value.to(self.model.device) for key, value in pixel_batch(images, self.image_settings).items()}

    @property
    def answers_per_prompt(self) -> int:
        return self.generation_config.num_return_sequences or 1

    @property
    def streams(self) -> bool:
        """Whether answers can be shown as they are generated: one greedy or sampled sequence.

        transformers refuses a streamer with beam search, and its streamer takes one sequence.
        """
        return (self.generation_config.num_beams or 1) == 1 and self.answers_per_prompt == 1  # None: unset

    def answer_batch(self, conversations: list[list[dict]]) -> list[list[str]]:
        """The answers to several conversations at once (left-padded batch): for each
        conversation, its `generate.num_return_sequences` answers."""
        import torch

        prompts = [self.prompt_ids(messages) for messages in conversations]
        batch = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            output = self.model.generate(input_ids=batch["input_ids"].to(self.model.device),
                                         attention_mask=batch["attention_mask"].to(self.model.device),
                                         **self.image_inputs(conversations),
                                         generation_config=self.generation_config, tokenizer=self.tokenizer)
        sequences = getattr(output, "sequences", output)  # a GenerateOutput with return_dict_in_generate
        answers = [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in sequences]
        # generate() returns the k sequences of each prompt next to each other.
        k = self.answers_per_prompt
        return [answers[i:i + k] for i in range(0, len(answers), k)]

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """The answer to one conversation, piece by piece as it is generated."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        # The tokenizer lets generate() find generation_config.stop_strings in the text.
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      generation_config=self.generation_config, tokenizer=self.tokenizer, **self.image_inputs([messages]))
        failures = []

        def generate() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
                failures.append(err)
                streamer.end()  # else the loop below waits forever for text that never comes

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failures:
            raise failures[0]


def load_generator(recipe: Recipe, model_path: str | None = None, tokenizer=None) -> Generator:
    """The run's base + adapter (4-bit as in training, or with generate.quantized=false the base
    as `merge.base` says, in `merge.dtype`), or `model_path`; `tokenizer`, the recipe's when the
    caller has it. What it loads was checked before (preflight.check_before_generate)."""
    from qlora_cli.data.tokenizer import load_recipe_tokenizer

    options = recipe.generate.options
    tokenizer = tokenizer or load_recipe_tokenizer(recipe)
    if model_path:
        model = _load_plain_model(model_path)
    else:
        from qlora_cli.model.load import load_adapter_model

        adapter = merge_adapter_dir(recipe)
        # Unquantized, the adapter runs on the base as `qlora merge` would merge it: by default
        # the 4-bit weights it was trained on, dequantized, not the original ones it never saw.
        model = load_adapter_model(recipe, adapter, quantized=options.quantized,
                                   dequantize=recipe.merge.base == "dequantized")
    config = build_generation_config(  # the tokenizer's special tokens for what the recipe leaves unset
        recipe.written("generate") or {}, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Generator(model.eval(), tokenizer, recipe.data.template, config, options.system_prompt,
                     image_settings_of(model, tokenizer))


def image_settings_of(model, tokenizer):
    """How the model sees images (the tokenizer's tekken.json image section, else the model's
    vision config), or None for a model without a vision tower."""
    from qlora_cli.data.images import image_settings

    config = model.config
    return image_settings(tokenizer, config) if getattr(config, "vision_config", None) is not None else None


def default_length_warning(recipe: Recipe) -> str | None:
    """What to tell a user whose recipe lets answers stop at transformers' default length."""
    if {"max_new_tokens", "max_length"} & set(recipe.written("generate") or {}):
        return None
    return ("the recipe sets no generate.max_new_tokens: answers stop after transformers' default of 20 new "
            "tokens; set e.g. generate.max_new_tokens=256")


CHOOSE_ONE = "choose one of --prompt TEXT, --input FILE (with --output FILE) and --interactive"


@dataclass
class Answering:
    """What one `qlora generate` answers: a prompt, the records of a prompts file, or a chat."""

    prompt: str | None = None
    images: list | None = None  # with `prompt`: data.images.ImageFile, shown before its text
    records: list[PromptRecord] | None = None
    output: Path | None = None  # where the records' answers go
    interactive: bool = False


def choose_answering(recipe: Recipe, *, prompt: str | None, input: Path | None, output: Path | None,
                     interactive: bool, resume: bool, model_path: str | None = None,
                     images: list[Path] | None = None) -> Answering:
    """Which one of --prompt (with its --image files), --input (with --output) and --interactive
    this run answers, every file read and checked, and what answers (`model_path`, else the run's
    adapter) checked too, before minutes of model loading. The recipe's `generate.input` and
    `generate.output` are the default mode, not a second one: a flag given now wins."""
    if images and prompt is not None and output is not None:
        raise UserError("--output takes the answers of --input lines; an answer about --image is printed",
                        where="--output", fix="drop --output, or put the image parts in an --input line")
    answering = _answering(recipe, prompt=prompt, input=input, output=output, interactive=interactive, resume=resume)
    if images and answering.prompt is None:
        raise UserError("--image goes with --prompt (the question about it)", where="--image",
                        fix='add --prompt "...", or put image parts in the --input lines')
    if images:
        answering.images = read_images(images)
    check_before_generate(recipe, model_path)
    return answering


def read_images(paths: list[Path]) -> list:
    """The --image files, each read and checked (a whole, decodable image of sensible size)."""
    from qlora_cli.data.images import load_image

    return [load_image(str(path), Path.cwd(), "--image") for path in paths]


def prompt_messages(prompt: str, images: list | None = None) -> list[dict]:
    """The one user turn of --prompt: its images first (as mistral-common puts a lone image), then its text."""
    if not images:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": prompt}]}]


def _answering(recipe: Recipe, *, prompt: str | None, input: Path | None, output: Path | None, interactive: bool,
               resume: bool) -> Answering:
    if sum([prompt is not None, input is not None, interactive]) > 1:
        raise UserError(CHOOSE_ONE)
    prompts_file = None if prompt is not None or interactive else input or recipe.generate.options.input
    answers_file = output or recipe.generate.options.output
    if prompt is None and prompts_file is None and not interactive:
        raise UserError(CHOOSE_ONE)
    if prompt is not None:
        check_prompt([{"role": "user", "content": prompt}], "--prompt")
        if output is not None:  # asked for a file: the prompt is its one record
            check_output(output, resume)
            record = PromptRecord("--prompt", [{"role": "user", "content": prompt}], {"prompt": prompt})
            return Answering(records=[record], output=output)
        return Answering(prompt=prompt)
    if interactive:
        check_chat(recipe)
        return Answering(interactive=True)
    records = read_prompts(Path(prompts_file))
    if not answers_file:
        raise UserError("--input needs --output FILE (or generate.output in the recipe)")
    check_output(Path(answers_file), resume, records)
    return Answering(records=records, output=Path(answers_file))


def check_chat(recipe: Recipe) -> None:
    """A chat continues from one answer: which of several would it be?"""
    if (recipe.generate.config.num_return_sequences or 1) > 1:
        raise UserError("--interactive continues the conversation from one answer, but "
                        f"generate.num_return_sequences is {recipe.generate.config.num_return_sequences}",
                        key="generate.num_return_sequences",
                        fix="use --prompt or --input for several answers per prompt, or set "
                            "generate.num_return_sequences=1")


def _load_plain_model(path: str):
    """A merged (or any) model folder, on the GPU when there is one, as the 4-bit loader places the
    base: without a device_map it would stay on the CPU and answer at CPU speed."""
    import torch
    from transformers import AutoConfig

    from qlora_cli.families import auto_model_class, checkpoint_family

    device_map = {"": 0} if torch.cuda.is_available() else None
    try:
        config = AutoConfig.from_pretrained(path)
        return auto_model_class(checkpoint_family(config, where="--model")).from_pretrained(
            path, config=config, dtype="auto", device_map=device_map)
    except (OSError, ValueError) as err:  # ValueError: a config.json transformers does not recognize
        raise UserError(f"cannot load model `{path}`: {err}", where="--model", fix=MODEL_FIX) from None


@dataclass
class PromptRecord:
    """One line of a prompts file: the conversation to answer and the record to write back."""

    where: str
    messages: list[dict]
    record: dict


def read_prompts(path: Path) -> list[PromptRecord]:
    """Lines of `prompt` (one user turn) or `messages` (ending with a user turn), checked."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a prompts file", where="--input", fix="give a JSONL file")
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist", where="--input")
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        line = _utf8(raw, where)
        if not line.strip():
            continue
        record = load_json(line, where)
        records.append(PromptRecord(where, _messages_of(record, where, path.parent), record))
    if not records:
        raise UserError(f"prompts file {path} has no prompts", where="--input")
    return records


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {err.start + 1}", where=where,
                        fix="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _messages_of(record, where: str, base: Path) -> list[dict]:
    if not isinstance(record, dict):
        raise UserError("each line must be a JSON object with `prompt` or `messages`", where=where)
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("messages"), list):
        messages = _with_images(record["messages"], base, where)
    else:
        raise UserError(f"line needs `prompt` (text) or `messages` (a list); it has: {', '.join(record) or 'none'}",
                        where=where)
    check_prompt(messages, where)
    return messages


def _with_images(messages: list, base: Path, where: str) -> list:
    """Messages whose content lists parts: their images read (relative paths beside the prompts
    file) and checked, as training data's are."""
    from qlora_cli.data.images import message_content

    if not any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
        return messages
    row_images = []  # a prompts line has no `images` column: every image part names its file
    return [{**m, "content": message_content(m["content"], m.get("role"), row_images, base, where, number)}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m
            for number, m in enumerate(messages, start=1)]


def check_prompt(messages: list[dict], where: str) -> None:
    """A conversation ending with a non-empty user turn, in the order training used."""
    try:
        check_roles(messages, last="user")
    except UserError as err:
        raise UserError(err.message, where=where, fix=err.fix) from None
    content = messages[-1]["content"]
    if isinstance(content, str) and not content.strip():  # parts hold an image: a question in itself
        raise UserError("the prompt is empty", where=where, fix="write a question")


def answer_file(generator: Generator, records: list[PromptRecord], output: Path, batch_size: int,
                resume: bool = False, on_batch: Callable[[int], None] | None = None) -> int:
    """Answer each record, appending `{...record, "response": ...}` lines to `output` as it goes
    (`"responses": [...]`, one line per record still, when generate.num_return_sequences > 1).

    Lines already in `output` are skipped with `resume`, so an interrupted run keeps its work;
    `on_batch` hears of them first, then of each batch answered. Returns how many were answered now.
    """
    check_output(output, resume, records)
    done = count_answered(output, records) if resume else 0
    if on_batch and done:
        on_batch(done)
    todo = records[done:]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        answers = generator.answer_batch([r.messages for r in batch])
        lines = [json.dumps({**item.record, **answer_fields(a)}, ensure_ascii=False) + "\n"
                 for item, a in zip(batch, answers, strict=True)]
        # Opened once there is something to write: a generation that fails leaves no empty file.
        append_lines(output, lines)
        if on_batch:
            on_batch(len(batch))
    return len(todo)


def append_lines(output: Path, lines: list[str]) -> None:
    """Append whole lines, or nothing: a write that fails (a full disk) leaves the file as it was,
    and no file at all where there was none."""
    from qlora_cli.atomic import write_failure

    existed = output.exists()
    size = output.stat().st_size if existed else 0
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output.open("a", encoding="utf-8") as out:
            out.writelines(lines)
    except OSError as err:
        if existed:
            os.truncate(output, size)
        else:
            output.unlink(missing_ok=True)
        raise write_failure(err, output, len("".join(lines).encode()), where="--output") from None


ANSWER_KEYS = ("response", "responses")


def answer_fields(answers: list[str]) -> dict:
    """`response` (text) for one answer per prompt, `responses` (a list) for several: a record
    keeps its line, so a resumed file still counts one line per prompt."""
    return {"response": answers[0]} if len(answers) == 1 else {"responses": answers}


def check_output(output: Path, resume: bool, records: list[PromptRecord] | None = None) -> None:
    """An answers file that can be written, and is not appended to unless resuming it, and then
    only if its lines are the answers to these `records` (called before loading the model, so a
    mistake costs no minutes of loading)."""
    from qlora_cli.atomic import can_create_in, nearest_existing

    if output.is_dir():
        raise UserError(f"output {output} is a folder", where="--output", fix="give a file, e.g. answers.jsonl")
    if output.exists() and not resume:
        raise UserError(f"output {output} already exists", where="--output",
                        fix="add --resume to continue it, or choose another file")
    blocking = output if output.exists() else nearest_existing(output.parent)
    writable = os.access(output, os.W_OK) if output.exists() else can_create_in(blocking)
    if not writable:
        raise UserError(f"cannot write {output}: {blocking} is not writable", where="--output",
                        fix="choose a file in a folder you can write")
    if resume and records is not None and output.is_file():
        answered_lines(output, records)


def count_answered(path: Path, records: list[PromptRecord]) -> int:
    """Answer lines in `path`, after cutting off a last line that a kill left unfinished."""
    if not path.exists():
        return 0
    count, size = answered_lines(path, records)
    if size != path.stat().st_size:
        with path.open("r+b") as file:
            file.truncate(size)
    return count


def answered_lines(path: Path, records: list[PromptRecord]) -> tuple[int, int]:
    """How many answers `path` holds and the size of its whole lines. Each line must be the record
    of its prompt plus its answer, as `answer_file` wrote it; any other file is refused (a resume
    cuts the file's end, and must never cut a file that is not ours)."""
    lines = path.read_bytes().split(b"\n")
    # After the last newline: empty, or a line cut short. A last line that ends in a newline but is
    # not JSON was also interrupted (a disk that filled up mid-write). Either is cut off only if it
    # starts as the answer to the next prompt would: a line of the user's is never cut.
    kept, cut = lines[:-1], lines[-1]
    if not cut and kept and kept[-1].strip() and not _is_json(kept[-1]):
        cut = kept.pop()
    count = 0
    for number, line in enumerate(kept, start=1):
        if not line.strip():
            continue
        if count == len(records):
            raise _not_answers(path, number, f"it has more answers than the {len(records)} prompts")
        _check_answer(path, number, line, records[count])
        count += 1
    if cut and (count == len(records) or not _begins_answer(cut, records[count])):
        raise _not_answers(path, len(kept) + 1, "its last line is not a cut-off answer to the next prompt")
    return count, sum(len(line) + 1 for line in kept)


def _begins_answer(cut: bytes, prompt: PromptRecord) -> bool:
    """Whether `cut` is the start of the line `answer_file` writes for `prompt`: the record's own
    fields, in its order, with the answer where the record has one (a `response` column of the
    user's keeps its place) or after them, up to the answer's text."""
    for key in ANSWER_KEYS:
        line = json.dumps({**prompt.record, key: None}, ensure_ascii=False)
        marker = json.dumps(key) + ": "  # a key, as json.dumps writes it; inside a value it is escaped
        head = line[:line.index(marker) + len(marker)].encode()
        if head.startswith(cut) or cut.startswith(head):
            return True
    return False


def _check_answer(path: Path, number: int, line: bytes, prompt: PromptRecord) -> None:
    try:
        answer = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise _not_answers(path, number, "the line is not JSON") from None
    if not isinstance(answer, dict) or not any(key in answer for key in ANSWER_KEYS):
        raise _not_answers(path, number, "the line has no `response`")
    if _asked(answer) != _asked(prompt.record):
        raise _not_answers(path, number, f"it answers another prompt than {prompt.where}")


def _asked(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ANSWER_KEYS}


def _not_answers(path: Path, number: int, why: str) -> UserError:
    return UserError(f"--resume would append to {path}, which is not this command's answers file: {why}",
                     where=f"{path}:{number}",
                     fix="give --output a new file (without --resume), or the answers file of these prompts")


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False
    return True
