"""How a prompt reaches a model: token ids with exactly one BOS, chat messages with their system
role, the stop rule that ends an answer, and the token a multiple-choice option is scored by.
Pure functions of a transformers tokenizer; training (tbr_ray.data), the vLLM engine and its
transformers check (tbr_ray.engine) all encode prompts through `prompt_token_ids`, so the model
sees the same ids in every stage.

    ids = prompt_token_ids(tok, format_prompt("Name a colour."))   # [BOS] + text, one BOS
    msgs = chat_messages(tok, system, user)       # system role kept iff the template keeps it
    text = render_chat(tok, msgs)                 # the template's text, generation prompt added
    rule = stop_rule(tok, "alpaca")               # StopRule(strings=("### Instruction:", ...), ...)
    choice_token_ids(tok, prompt, [" A", " B"])   # the ids the model would emit after `prompt`

Tested with the real tokenizers in ../shared/tokenizers (tests/test_prompts.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# A base model answering an Alpaca prompt often writes the next, invented turn of the template;
# its "I don't ..." would then count as a refusal. These markers end an answer. The last one
# opens every Alpaca block, so a few-shot prompt's next shot stops it too.
ALPACA_STOP_STRINGS = (
    "### Instruction:",
    "### Input:",
    "### Response:",
    "Below is an instruction that describes a task",
)
# The prompting experiment on a model without a chat template: "Question: ...\nAnswer:".
PLAIN_QA_STOP_STRINGS = ("\nQuestion:",)
STOP_KINDS = ("alpaca", "chat", "plain")
_MARK = "TBR-MARK-7f3a"  # text no template writes itself, to find content in a rendering


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the model expects at the start of every prompt, or None when it has none.
    A model wants a BOS when its tokenizer adds one to plain text (Llama-1/2, Gemma) or its
    chat template writes one (Llama-3's instruct tokenizer, whose plain encoding adds none).
    The tiny presets declare `<s>` but never add it, and were pre-trained without it: None.
    ChatML models (SmolLM2) name `<|im_start|>` their BOS, but it opens every turn, plain
    text gets none, and the template writes no BOS of its own: None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    if tokenizer("a")["input_ids"][:1] == [bos]:
        return bos
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # A BOS opens the text once; a token that opens every turn is a turn marker that
        # merely shares the name (ChatML's <|im_start|> is SmolLM2's bos_token): no BOS.
        if ids[:1] == [bos] and ids.count(bos) == 1:
            return bos
    return None


def prompt_token_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The ids the model sees for a prompt (plain text, a rendered chat template, or chat
    messages): the text's own tokens, special tokens written in it parsed as such, with
    exactly one BOS in front when the model has one (`bos_token_id`), none otherwise. A BOS the
    text already starts with (chat templates write `{{ bos_token }}`) is not doubled."""
    text = render_chat(tokenizer, prompt) if isinstance(prompt, list) else prompt
    return _one_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos_token_id(tokenizer))


def prompt_token_ids_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """`prompt_token_ids` of many plain-text prompts in one batched tokenizer call (the fast
    tokenizer encodes the batch in Rust; same ids as one call per prompt)."""
    if not texts:
        return []
    bos = bos_token_id(tokenizer)
    return [_one_bos(ids, bos) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _one_bos(ids: list[int], bos: int | None) -> list[int]:
    if bos is None:
        return ids
    while ids[:1] == [bos]:
        ids = ids[1:]
    return [bos, *ids]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template's text for `messages`, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PROMPT_FORMATS = ("alpaca", "chat")  # tbr_ray.models.ModelSpec.prompt_format


def chat_turns(instruction: str, shots: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """A request as chat messages: each shot a user turn and its assistant answer, then the
    request. No system message: the template adds its default one where it has one."""
    turns = []
    for question, answer in shots:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [*turns, {"role": "user", "content": instruction}]


def chat_prompt(
    tokenizer, instruction: str, shots: tuple[tuple[str, str], ...] = (), answer_prefix: str = ""
) -> str:
    """The prompt of a chat model (prompt_format "chat") for a request: its template's text of
    `chat_turns`, the generation prompt, then `answer_prefix` (e.g. "Answer:") already written
    at the start of the assistant's turn."""
    return render_chat(tokenizer, chat_turns(instruction, shots)) + answer_prefix


def user_text(instruction: str, input_text: str = "") -> str:
    """An Alpaca row's instruction and input as one user turn (chat format)."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def end_of_answer_id(tokenizer, prompt_format: str) -> int:
    """The token a training answer ends with: EOS (alpaca), or the token the chat template
    closes an assistant turn with (chat; SmolLM2's `<|im_end|>`, Llama-3's `<|eot_id|>`)."""
    if prompt_format == "chat":
        ids = end_of_turn_ids(tokenizer)
        if ids:
            return ids[0]
    return tokenizer.eos_token_id


def has_system_role(tokenizer) -> bool:
    """Whether the chat template takes a system message: it renders one (Llama-2-chat's
    <<SYS>> block, Llama-3's system header, Gemma-3 folding it into the first user turn)
    rather than raising (Gemma-1's "System role not supported") or dropping its text."""
    from jinja2.exceptions import TemplateError

    msgs = [{"role": "system", "content": _MARK}, {"role": "user", "content": "a"}]
    try:
        return _MARK in render_chat(tokenizer, msgs)
    except TemplateError:
        return False


def chat_messages(tokenizer, system: str, user: str) -> list[dict]:
    """A system + user exchange for this tokenizer's template: the system message in its own
    role where the template has one, else merged in front of the user turn."""
    if has_system_role(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The special token(s) the chat template closes an assistant turn with, found by
    rendering one (Llama-3 `<|eot_id|>`, Gemma `<end_of_turn>`, Llama-2-chat `</s>`)."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": _MARK}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return tuple(t for t in tail[:3] if t in special)[:1]


@dataclass(frozen=True)
class StopRule:
    """Where a generation ends: at the first of `strings` in its text (cut from the text) or
    at one of `token_ids` (EOS and end-of-turn tokens). vLLM gets them as SamplingParams
    `stop` / `stop_token_ids`; the transformers reference applies the same rule."""

    kind: str  # alpaca | chat | plain
    strings: tuple[str, ...]
    token_ids: tuple[int, ...]

    def to_json(self) -> str:
        """The rule as stored in results (generations.stop_rule) and passed between stages."""
        return json.dumps(
            {"kind": self.kind, "strings": list(self.strings), "token_ids": list(self.token_ids)}
        )

    @classmethod
    def from_json(cls, text: str) -> StopRule | None:
        if not text:
            return None
        d = json.loads(text)
        return cls(d["kind"], tuple(d["strings"]), tuple(d["token_ids"]))


def stop_rule(tokenizer, kind: str) -> StopRule:
    """The stop rule for a prompt of `kind`: `alpaca` (the fine-tuning template, and few-shot
    prompts built from it): its turn markers and EOS; `chat`: EOS and the template's
    end-of-turn token; `plain` (prompting experiment without a template): the next
    "Question:" and EOS."""
    if kind not in STOP_KINDS:
        raise ValueError(f"stop rule kind {kind!r} is unknown. Fix: use one of {STOP_KINDS}.")
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    if kind == "chat":
        ids = tuple(dict.fromkeys(eos + end_of_turn_ids(tokenizer)))
        return StopRule(kind, (), ids)
    strings = ALPACA_STOP_STRINGS if kind == "alpaca" else PLAIN_QA_STOP_STRINGS
    return StopRule(kind, strings, eos)


def choice_token_ids(tokenizer, prompt: str, choices: list[str]) -> list[int]:
    """For each option (e.g. " A"), the one token the model emits after `prompt` to write it:
    the last id of prompt + option, which must extend the prompt's own ids by exactly one
    token (so a tokenizer that merges across the boundary, or splits the option, is refused
    rather than scored on a token the model would never produce there)."""
    base = prompt_token_ids(tokenizer, prompt)
    out = []
    for choice in choices:
        full = prompt_token_ids(tokenizer, prompt + choice)
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ValueError(
                f"choice {choice!r} after this prompt is not one token appended to the "
                f"prompt's tokens for this tokenizer ({len(full) - len(base)} tokens, prefix "
                f"{'kept' if full[: len(base)] == base else 'changed'}); multiple-choice "
                f"scoring needs single-token continuations such as ' A'."
            )
        out.append(full[-1])
    return out
