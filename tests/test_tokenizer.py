"""Tests for agentrl.model.tokenizer: determinism, byte-level round trip, digit splitting, special
tokens, save/load through AutoTokenizer, and the exact text of the chat template."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentrl.model.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, save_tokenizer

EXPECTED_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, d)
    return d


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


# ---------------------------------------------------------------- determinism and sizes


def test_two_builds_save_byte_identical_files(tmp_path):
    save_tokenizer(build_tokenizer(), tmp_path / "a")
    save_tokenizer(build_tokenizer(), tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "tokenizer.json" in a
    assert a == b


def test_build_in_fresh_process_matches(tmp_path, saved_dir):
    # A new process has new Rust HashMap seeds and a new PYTHONHASHSEED: the merges must not care.
    code = (
        "import sys; from agentrl.model.tokenizer import build_tokenizer, save_tokenizer; "
        "save_tokenizer(build_tokenizer(), sys.argv[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=repo_root)

    def digest(d):
        return hashlib.sha256((Path(d) / "tokenizer.json").read_bytes()).hexdigest()

    assert digest(tmp_path) == digest(saved_dir)


@pytest.mark.parametrize("vocab_size", [300, 512, 1000, 4096])
def test_vocab_size_is_exact_and_special_ids_stable(vocab_size):
    t = build_tokenizer(vocab_size)
    assert len(t) == vocab_size
    assert max(t.get_vocab().values()) == vocab_size - 1
    assert t.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    pieces = [t.decode([i]) for i in t.encode("12 + 345")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4", "5"]
    s = "héllo 😀 wörld\n\t42"
    assert t.decode(t.encode(s)) == s


@pytest.mark.parametrize("vocab_size", [0, 299, 4097])
def test_vocab_size_out_of_range_raises(vocab_size):
    with pytest.raises(ValueError):
        build_tokenizer(vocab_size)


def test_larger_vocab_gives_shorter_encodings():
    text = "What is 37 * 4? The answer is 148. Let me check the file and run the tests."
    assert len(build_tokenizer(2048).encode(text)) < len(build_tokenizer(300).encode(text))


# ---------------------------------------------------------------- round trip


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ",
        " \n\t\r  \n\n",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éüñçøßåÆŒ",
        "日本語中文한국어",
        "😀🚀👍🏽🇫🇷👨‍👩‍👧",
        "\u0301\u200b\u00a0\ufeff",  # combining accent, zero-width space, nbsp, BOM
    ]
    out = []
    for _ in range(n):
        k = rng.randint(0, 60)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    # Also arbitrary code points (valid UTF-8: no lone surrogates).
    for _ in range(n // 4):
        chars = []
        while len(chars) < rng.randint(1, 30):
            cp = rng.randint(1, 0x10FFFF)
            if not 0xD800 <= cp <= 0xDFFF:
                chars.append(chr(cp))
        out.append("".join(chars))
    return out


def test_round_trip_random_unicode(tok):
    strings = _random_strings(200, seed=0)
    assert any("\n" in s for s in strings) and any("😀" in s for s in strings)
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s, repr(s)
    assert tok.encode("", add_special_tokens=False) == []


def test_round_trip_keeps_spaces_and_special_tokens(tok):
    for s in ["  leading and trailing  ", "a . b , c ' d n't", "x\n\n\ny", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.decode(tok.encode(s)) == s


# ---------------------------------------------------------------- digits


def test_each_digit_is_its_own_token(tok):
    ids = tok.encode("1234567890", add_special_tokens=False)
    assert len(ids) == 10
    assert [tok.decode([i]) for i in ids] == list("1234567890")


def test_digits_inside_text_are_split(tok):
    text = "What is 37 * 4? The answer is 148. x9y 2024-01-05 v3.11"
    toks = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    for piece in toks:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, (piece, toks)
    assert "".join(toks) == text
    assert sum(piece.isdigit() for piece in toks) == sum(c.isdigit() for c in text)


# ---------------------------------------------------------------- special tokens


def test_special_tokens_lowest_ids_in_order(tok):
    assert SPECIAL_TOKENS == EXPECTED_SPECIALS
    for i, t in enumerate(EXPECTED_SPECIALS):
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.decode([i]) == t
    assert set(tok.all_special_ids) >= {0, 2}
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.bos_token is None
    assert tok.model_max_length == 32768


def test_special_token_inside_text_is_one_id(tok):
    ids = tok.encode('ok<tool_call>\n{"name": "calc"}</tool_call>done', add_special_tokens=False)
    assert ids.count(3) == 1 and ids.count(4) == 1
    assert tok.decode(ids[: ids.index(3)]) == "ok"
    assert tok.decode(ids[ids.index(3) + 1 : ids.index(4)]) == '\n{"name": "calc"}'
    assert tok.decode(ids[ids.index(4) + 1 :]) == "done"


def test_skip_special_tokens_drops_them(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


# ---------------------------------------------------------------- save / load


def test_autotokenizer_loads_saved_dir(tok, saved_dir):
    loaded = AutoTokenizer.from_pretrained(str(saved_dir))
    sample = 'What is 37 * 4?<tool_call>\n{"name": "calc"}\n</tool_call> héllo 😀\n'
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.decode(loaded.encode(sample)) == sample
    assert loaded.chat_template == tok.chat_template == CHAT_TEMPLATE
    assert loaded.eos_token == "<|im_end|>" and loaded.eos_token_id == 2
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id == 0
    assert loaded.bos_token is None
    assert len(loaded) == len(tok) == 512
    assert loaded.convert_ids_to_tokens(loaded.encode("1234")) == ["1", "2", "3", "4"]


def test_saved_config_is_readable_by_older_transformers(saved_dir):
    config = json.loads((Path(saved_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (Path(saved_dir) / "chat_template.jinja").exists()


# ---------------------------------------------------------------- chat template

TOOLS = [
    {"type": "function", "function": {
        "name": "calc", "description": "Evaluate an arithmetic expression, e.g. 2 × 3.",
        "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}}},
    {"type": "function", "function": {
        "name": "bash", "description": "Run a shell command.",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
]

MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 37 * 4, and list the files?"},
    {"role": "assistant", "content": "I will use the tools.", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expr": "37 * 4"}}},
        {"type": "function", "function": {"name": "bash", "arguments": '{"command": "ls -la"}'}},
    ]},
    {"role": "tool", "content": "148"},
    {"role": "tool", "content": "README.md\nsetup.py"},
    {"role": "assistant", "content": "The answer is 148."},
]


def _expected_render() -> str:
    """The conversation above, built by hand from the documented Qwen3 layout."""
    s = "<|im_start|>system\n"
    s += "You are a careful assistant." + "\n\n"
    s += "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    s += "You are provided with function signatures within <tools></tools> XML tags:\n"
    s += "<tools>\n"
    s += '{"type": "function", "function": {"name": "calc", "description": "Evaluate an arithmetic expression, '
    s += 'e.g. 2 × 3.", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, '
    s += '"required": ["expr"]}}}\n'
    s += '{"type": "function", "function": {"name": "bash", "description": "Run a shell command.", '
    s += '"parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}\n'
    s += "</tools>\n\n"
    s += "For each function call, return a json object with function name and arguments within "
    s += "<tool_call></tool_call> XML tags:\n"
    s += '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    s += "<|im_end|>\n"
    s += "<|im_start|>user\nWhat is 37 * 4, and list the files?<|im_end|>\n"
    s += "<|im_start|>assistant\nI will use the tools.\n"
    s += '<tool_call>\n{"name": "calc", "arguments": {"expr": "37 * 4"}}\n</tool_call>\n'
    s += '<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}\n</tool_call>'
    s += "<|im_end|>\n"
    s += "<|im_start|>user\n"
    s += "<tool_response>\n148\n</tool_response>\n"
    s += "<tool_response>\nREADME.md\nsetup.py\n</tool_response>"
    s += "<|im_end|>\n"
    s += "<|im_start|>assistant\nThe answer is 148.<|im_end|>\n"
    return s


def test_chat_template_exact_render(tok):
    rendered = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    assert rendered == _expected_render()


def test_chat_template_generation_prompt(tok):
    with_prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert with_prompt == _expected_render() + "<|im_start|>assistant\n"
    assert with_prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_tokenized_equals_encoded_text(tok):
    text = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    out = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1  # <|im_start|>, no BOS
    assert 1 in ids[-4:] and tok.decode(ids[ids.index(1, len(ids) - 4):]) == "<|im_start|>assistant\n"
    # Two real tool calls plus the two <tool_call></tool_call> pairs in the system instruction.
    assert ids.count(3) == 4 and ids.count(4) == 4


def test_chat_template_without_tools_or_system(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    msgs = [{"role": "system", "content": "S."}] + msgs
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


def test_chat_template_tool_call_without_content_and_tools_without_system(tok):
    msgs = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "2 + 2"}}}]},
        {"role": "tool", "content": "4"},
    ]
    rendered = tok.apply_chat_template(msgs, tools=TOOLS[:1], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n# Tools\n\n")
    assert rendered.endswith(
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calc", "arguments": {"expr": "2 + 2"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
