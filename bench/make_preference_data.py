"""Writes the shipped preference files from sample_data.jsonl: sample_preference.jsonl (DPO pairs)
and sample_unpaired.jsonl (KTO signed examples).

The chosen answer is the sample's own (plus arithmetic questions answered correctly); the
rejected one is an unhelpful reply: a preference a tiny model can learn and carry over to
held-out prompts. Every 8th pair is written in the hub layout (whole conversations sharing their
prompt), so the shipped file exercises both shapes of the `preference` format.

    python bench/make_preference_data.py
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNHELPFUL = ["I don't know.", "I cannot help with that.", "Ask someone else.", "No idea, sorry.",
             "That is not something I can answer.", "Why would you want to know that?"]


def sample_questions() -> list[tuple[str, str]]:
    pairs = []
    for line in (ROOT / "sample_data.jsonl").read_text(encoding="utf-8").splitlines():
        question, answer = json.loads(line)["text"].split("[INST]", 1)[1].split("[/INST]", 1)
        pairs.append((question.strip(), answer.replace("</s>", "").strip()))
    return pairs


def arithmetic(rng: random.Random, count: int) -> list[tuple[str, str]]:
    questions = []
    for _ in range(count):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if rng.random() < 0.5:
            questions.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        else:
            questions.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    return questions


def main() -> None:
    rng = random.Random(0)
    questions = sample_questions() + arithmetic(rng, 66)
    rng.shuffle(questions)
    pairs, signed = [], []
    for index, (question, answer) in enumerate(questions):
        rejected = rng.choice(UNHELPFUL)
        if index % 8 == 7:
            user = {"role": "user", "content": question}
            pairs.append({"chosen": [user, {"role": "assistant", "content": answer}],
                          "rejected": [user, {"role": "assistant", "content": rejected}]})
        else:
            pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
        signed.append({"prompt": question, "completion": answer, "label": True})
        signed.append({"prompt": question, "completion": rejected, "label": False})
    for name, rows in (("sample_preference.jsonl", pairs), ("sample_unpaired.jsonl", signed)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (ROOT / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
