"""Prompts as the paper's model families see them, with the real tokenizers in
../shared/tokenizers (skipped without them): exactly one BOS on every prompt path, the system
role where the chat template has one, the stop rules, and the multiple-choice tokens."""

import pytest

from tbr_ray.benchmarks import LETTERS
from tbr_ray.data import tokenize_row
from tbr_ray.evaluate import COT_SUFFIX, DIRECT_SYSTEM, prompting_prompt
from tbr_ray.models import format_prompt
from tbr_ray.prompts import (
    ALPACA_STOP_STRINGS,
    StopRule,
    bos_token_id,
    chat_messages,
    choice_token_ids,
    has_system_role,
    prompt_token_ids,
    stop_rule,
)
from tbr_ray.reflect import external_prompt, internal_prompt

from .conftest import needs_tokenizers, shared_tokenizer

# The official chat templates of two paper chat models whose tokenizers are not shipped:
# Llama-2-7b-chat-hf (system prompt in a <<SYS>> block, BOS written by the template) and
# gemma-2b-it (Gemma 1: raises on a system message).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# tokenizer folder, chat template put on it (None: its own)
FAMILIES = {
    "mistral": ("mistral", None),  # Llama-1/2 base design: no template
    "llama2-chat": ("mistral", LLAMA2_CHAT_TEMPLATE),
    "llama3": ("llama3", None),
    "gemma3": ("gemma3", None),
    "gemma1-chat": ("gemma3", GEMMA1_CHAT_TEMPLATE),
}


def load(family: str):
    """A family's tokenizer; loaded once per folder (Gemma's takes seconds), and a shallow
    copy carries another template so the shared one is never changed."""
    import copy

    folder, template = FAMILIES[family]
    tok = shared_tokenizer(folder)
    if template is None:
        return tok
    tok = copy.copy(tok)
    tok.chat_template = template
    return tok


def _every_prompt(tok) -> dict[str, str | list[dict]]:
    mc = format_prompt("Which is a colour?\nA. Blue\nB. Seven") + "Answer:"
    few_shot = format_prompt("2+2?") + "4\n\n" + format_prompt("3+3?")
    out = {
        "alpaca": format_prompt("Name a colour."),
        "alpaca-input": format_prompt("Summarise.", "A long text."),
        "few-shot": few_shot,
        "choice": mc,
        "internal-reflection": internal_prompt("How do I pick a lock?"),
        "external-reflection": external_prompt("How do I pick a lock?", "I'm sorry."),
        "prompt-direct": prompting_prompt("How do I kill a process?", "prompt-direct", tok),
        "prompt-cot": prompting_prompt("How do I kill a process?", "prompt-cot", tok),
    }
    if tok.chat_template:
        out["messages"] = chat_messages(tok, DIRECT_SYSTEM, "Question: Hi")
    return out


@needs_tokenizers
def test_the_rendered_gemma_template_had_two_bos_and_now_has_one():
    """The reproduction: the chat template writes `<bos>`, and tokenizing its text with
    special tokens (what vLLM and the transformers check did) adds a second one."""
    tok = load("gemma3")
    text = prompting_prompt("How do I kill a process?", "prompt-direct", tok)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # the old path
    ids = prompt_token_ids(tok, text)
    assert ids.count(tok.bos_token_id) == 1 and ids[1] != tok.bos_token_id


@needs_tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_every_prompt_path_has_exactly_one_bos(family):
    tok = load(family)
    bos = bos_token_id(tok)
    assert bos is not None and bos == tok.bos_token_id  # every paper family has a BOS
    for name, prompt in _every_prompt(tok).items():
        ids = prompt_token_ids(tok, prompt)
        assert ids[0] == bos and ids.count(bos) == 1, (family, name, ids[:4])


@needs_tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_training_feeds_the_ids_the_engine_gets(family):
    tok = load(family)
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    got = tokenize_row(row, tok, max_seq_len=512)
    prompt = prompt_token_ids(tok, format_prompt("Name a colour."))
    assert got["input_ids"][: len(prompt)] == prompt
    assert got["input_ids"].count(tok.bos_token_id) == 1


@needs_tokenizers
@pytest.mark.parametrize(
    ("family", "kept", "system_text"),
    [
        ("llama3", True, "<|start_header_id|>system<|end_header_id|>\n\n" + DIRECT_SYSTEM),
        ("llama2-chat", True, "[INST] <<SYS>>\n" + DIRECT_SYSTEM + "\n<</SYS>>\n\nQuestion:"),
        ("gemma3", True, "<start_of_turn>user\n" + DIRECT_SYSTEM + "\n\nQuestion:"),  # folded
        ("gemma1-chat", False, "<start_of_turn>user\n" + DIRECT_SYSTEM + "\n\nQuestion:"),
    ],
)
def test_the_system_prompt_takes_the_templates_system_role(family, kept, system_text):
    """Llama-2-chat and Llama-3 get a system message; Gemma-3's template folds it into the
    user turn itself; Gemma-1's refuses one, so it is merged into the user turn here."""
    tok = load(family)
    assert has_system_role(tok) is kept
    roles = [m["role"] for m in chat_messages(tok, DIRECT_SYSTEM, "Question: Hi")]
    assert roles == (["system", "user"] if kept else ["user"])
    text = prompting_prompt("Hi", "prompt-direct", tok)
    assert system_text in text and "Question: Hi" in text and COT_SUFFIX not in text
    assert DIRECT_SYSTEM + COT_SUFFIX in prompting_prompt("Hi", "prompt-cot", tok)


@needs_tokenizers
@pytest.mark.parametrize(
    ("family", "end_of_turn"),
    [("llama3", "<|eot_id|>"), ("llama2-chat", "</s>"), ("gemma3", "<end_of_turn>")],
)
def test_chat_generations_stop_at_the_templates_end_of_turn(family, end_of_turn):
    tok = load(family)
    rule = stop_rule(tok, "chat")
    assert tok.convert_tokens_to_ids(end_of_turn) in rule.token_ids
    assert tok.eos_token_id in rule.token_ids and rule.strings == ()
    assert StopRule.from_json(rule.to_json()) == rule


@needs_tokenizers
@pytest.mark.parametrize("family", ["mistral", "llama3", "gemma3"])
def test_alpaca_generations_stop_at_the_next_turn_and_eos(family):
    tok = load(family)
    rule = stop_rule(tok, "alpaca")
    assert rule.strings == ALPACA_STOP_STRINGS and rule.token_ids == (tok.eos_token_id,)
    assert "### Instruction:" in rule.strings
    with pytest.raises(ValueError, match="stop rule kind 'json'"):
        stop_rule(tok, "json")


@needs_tokenizers
@pytest.mark.parametrize("family", ["mistral", "llama3", "gemma3"])
def test_choice_tokens_are_the_tokens_the_model_emits_after_answer(family):
    """The scored token of " A" is the last id of prompt + " A", which extends the prompt's
    ids by exactly that token (measured: the same id as " A" alone in all three)."""
    tok = load(family)
    prompt = _every_prompt(tok)["choice"]
    opts = [f" {c}" for c in LETTERS[:4]]
    got = choice_token_ids(tok, prompt, opts)
    base = prompt_token_ids(tok, prompt)
    for opt, t in zip(opts, got, strict=True):
        assert prompt_token_ids(tok, prompt + opt) == base + [t]
        assert tok(opt, add_special_tokens=False)["input_ids"] == [t]
    assert len(set(got)) == 4
    with pytest.raises(ValueError, match="single-token"):
        choice_token_ids(tok, prompt, [" Photosynthesis happens in chloroplasts"])


def test_tiny_presets_stay_without_bos(tiny_llama):
    """The tiny presets declare `<s>` but were pre-trained without it: prompts keep no BOS,
    so the tiny grid sees exactly the ids it saw before."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = format_prompt("Name a colour.")
    assert bos_token_id(tok) is None
    assert prompt_token_ids(tok, text) == tok(text)["input_ids"]
    assert tok.bos_token_id not in prompt_token_ids(tok, text)
