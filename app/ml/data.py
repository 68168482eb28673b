"""Training data for prefix tuning: records -> examples -> token ids and labels -> batches.

Records are OpenAI fine-tuning JSONL lines, either `{"prompt", "completion"}` or
`{"messages": [...]}` (chat). A chat record becomes a prompt/completion pair: everything before
the last assistant message is the prompt (through the tokenizer's chat template when it has one),
and the last assistant message is the completion.

Tokenisation (`tokenize_example`): prompt ids + completion ids + EOS. Prompt and completion are
encoded separately, exactly as at inference time, where the prompt is encoded alone and the model
continues it. Labels are -100 on the prompt, so the loss counts the completion tokens and the EOS
(the EOS teaches the prefix where to stop). Too long examples lose prompt tokens from the left: the
completion is what we learn, and the end of the prompt is what it depends on most.

Batching (`bucket_batches`): shuffle, cut into chunks of a few dozen batches, sort each chunk by
length, cut into batches, shuffle the batch order. Rows in a batch then have similar lengths (little
padding) while the epoch order stays random. Everything is a pure function of (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of positions the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]  # prompt ids + completion ids + EOS
    labels: list[int]  # IGNORE_INDEX on the prompt, the token ids on completion and EOS

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def format_chat(messages: Sequence[Mapping], tokenizer=None, add_generation_prompt: bool = True) -> str:
    """Render chat messages as prompt text.

    Uses the tokenizer's chat template when it has one. Otherwise a plain fallback, one line per
    message, `"{role}: {content}\\n"`, and with `add_generation_prompt` a trailing `"assistant: "`:

        user: Hi
        assistant: 
    """
    msgs = [{"role": str(m["role"]), "content": _content_text(m.get("content"))} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
    return text + ("assistant: " if add_generation_prompt else "")


def _content_text(content) -> str:
    # OpenAI allows content as a list of parts: [{"type": "text", "text": ...}, ...]
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    raise ValueError(f"unsupported message content: {type(content).__name__}")


def example_from_record(record: Mapping, tokenizer=None) -> Example:
    """One JSONL record -> `Example`. Raises ValueError on a malformed record.

    The tokenizer is only used for its chat template (chat records); without it, or without a
    template, chat records use the plain fallback of `format_chat`.
    """
    if not isinstance(record, Mapping):
        raise ValueError("a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise ValueError("every message needs a 'role'")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a chat record needs an assistant message to learn")
        prompt = format_chat(messages[:last], tokenizer, add_generation_prompt=True)
        return Example(prompt, _content_text(messages[last].get("content")))
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return Example(prompt, completion)
    raise ValueError("a record needs 'prompt' and 'completion', or 'messages'")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as inference encodes them: the tokenizer's own special tokens (e.g. a Llama BOS)
    are added unless the text already starts with the BOS text (chat templates write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])


def tokenize_example(example: Example, tokenizer, max_seq_len: int) -> TokenizedExample:
    """Prompt ids + completion ids + EOS, truncated to `max_seq_len` (see the module docstring).

    Edge cases: a completion longer than `max_seq_len - 1` keeps its first tokens and loses its EOS
    (one prompt token is always kept: the first completion token is predicted from it). An empty
    prompt becomes the single BOS (or EOS) token for the same reason.
    """
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be >= 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    prompt = encode_prompt(tokenizer, example.prompt)
    if not prompt:
        start = tokenizer.bos_token_id
        prompt = [eos if start is None else start]
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [eos]
    completion = completion[: max_seq_len - 1]
    prompt = prompt[-(max_seq_len - len(completion)) :]
    return TokenizedExample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def collate(items: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest row (the repo-wide convention: real tokens end every row, so a row's
    completion sits at the same end positions whatever its length). Returns input_ids,
    attention_mask (1 on real tokens) and labels (IGNORE_INDEX on padding)."""
    L = max(len(x) for x in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE_INDEX, dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x)
        ids[row, L - n :] = torch.tensor(x.input_ids)
        mask[row, L - n :] = 1
        labels[row, L - n :] = torch.tensor(x.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucket_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, chunk_batches: int = 32
) -> list[list[int]]:
    """Index batches for one epoch, length-bucketed within shuffled chunks (see module docstring).

    Deterministic in (seed, epoch) and independent of any global RNG state.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = random.Random(f"{seed}:{epoch}")  # str seeds hash stably (sha512), unlike tuples
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, chunk_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])  # stable: ties keep shuffle
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches sorted by length, for evaluation (order does not matter there)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
