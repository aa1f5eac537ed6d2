"""agentrl's local tokenizer: a byte-level BPE trained offline, plus its Qwen3-style chat template.

Owns:
  * ``SPECIAL_TOKENS`` -- the fixed special tokens, which take ids ``0..len(SPECIAL_TOKENS)-1`` in
    that order for every vocabulary size, so ids stay stable across sizes.
  * ``CHAT_TEMPLATE`` -- the Jinja chat template (Qwen3 layout: ``<|im_start|>role\\n...<|im_end|>``,
    tools in the system turn, ``<tool_call>`` JSON in assistant turns, consecutive ``tool`` messages
    grouped into one user turn of ``<tool_response>`` blocks).
  * ``build_tokenizer`` -- trains the BPE with the ``tokenizers`` library on a small corpus generated
    here from ``random.Random(0)`` (chat, arithmetic, JSON tool calls, English, Python, paths, shell),
    so the result is byte-identical on every machine and needs no network, in well under 2 s.
  * ``save_tokenizer`` -- writes it beside a checkpoint, loadable by
    ``transformers.AutoTokenizer.from_pretrained(dir)``.

Design: byte-level (any UTF-8 text round-trips exactly, no normalizer, no unknown token); digits are
always single tokens (``Digits(individual_digits=True)`` before ``ByteLevel``) so a tiny model can
copy numbers; no BOS; ``<|endoftext|>`` is the pad token and ``<|im_end|>`` the EOS of a chat turn.

Does not own: model weights or configs (the model modules build those and size their embeddings
from ``len(tokenizer)``), nor any rollout-side parsing of tool calls.
"""

from __future__ import annotations

import json
import os
import random
import re

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "build_tokenizer", "save_tokenizer"]

# Fixed order = fixed ids (0..8) for every vocab size. Never reorder; only append.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
DEFAULT_VOCAB_SIZE = 512
MIN_VOCAB_SIZE = 300
MAX_VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 32768

# Qwen3-style template without thinking-mode logic. Every tag trims the whitespace before it, so
# the indentation below never reaches the output. ``tojson`` is transformers' override: json.dumps
# with ensure_ascii=False and the default ", " / ": " separators. Tool-call ``arguments`` given as
# a JSON string are inserted verbatim, as a dict they are dumped (Qwen3 behaviour).
CHAT_TEMPLATE: str = r"""{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if part.type == 'text' %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n' }}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = render_content(message.content) %}
        {{- '<|im_start|>assistant\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""


# --------------------------------------------------------------------------------------------
# Deterministic training corpus
# --------------------------------------------------------------------------------------------

_WORDS = (
    "the a an is are was were be been to of and in on at for with from by as that this it its "
    "you your we our they them he she his her i me my not no yes do does did can could will would "
    "should may might must have has had what which who where when why how all any some each every "
    "more most many much few first last next new old good bad big small long short high low right "
    "left true false number numbers answer question problem result value values sum total add "
    "subtract multiply divide plus minus times equals equal step steps think check compute count "
    "file files line lines code function functions class method test tests error errors bug fix "
    "change changes edit read write open close find search page pages link links result results "
    "query user assistant system tool tools call calls response message content name arguments "
    "list string integer return print import path directory repository branch commit run command "
    "output input data model train training reward agent task tasks world time day year people "
    "city country book water house school work help use used using make made take get set go see "
    "know like want need try give find keep start stop show tell ask say said because so but or "
    "if then else while until after before about over under between into out up down here there "
    "now just only also very well still even again other same different important simple example "
    "information article title section summary source sources date version update updated install "
    "package module library config settings option options default empty missing invalid request "
    "server client status success failed done please thanks hello sure okay let us one two three "
    "four five six seven eight nine ten hundred thousand half double twice apple apples box boxes "
    "price cost store buy sell each per hour hours minute minutes meter meters mile miles car train "
    "river mountain history science music game games team player players friend friends family"
).split()

_SYLLABLES = (
    "ka lo mi ra te su no ve zi pa ro da fe gu li mo na sa ti vo ba ce di en fa ga hi ja ko lu ma "
    "ne or pe qu re si tu un vi wa xe yo ze al be co du el fi go hu in ju ki la me ni ob pi ru se "
    "to ur va we ix ya zo str con pro ter ion ing ent ant ard est ork ash ell ump ack ick ove"
).split()

_TOOL_SPECS = (
    {"name": "calc", "description": "Evaluate an arithmetic expression.",
     "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}},
    {"name": "bash", "description": "Run a shell command in the repository.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
    {"name": "view_file", "description": "Show a file with line numbers.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "str_replace", "description": "Replace one exact string in a file.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "old_str": {"type": "string"},
                                                      "new_str": {"type": "string"}},
                    "required": ["path", "old_str", "new_str"]}},
    {"name": "search", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "open", "description": "Open a page by id or url.",
     "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
    {"name": "find", "description": "Find a pattern in the open page.",
     "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}},
    {"name": "answer", "description": "Give the final answer.",
     "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}},
)

_PY_SNIPPETS = (
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.path.join(sys.argv[1], 'out.txt'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n    print(i)\n",
    "class Config:\n    def __init__(self, path: str) -> None:\n        self.path = path\n        self.values = {}\n",
    "    def get(self, key, default=None):\n        return self.values.get(key, default)\n",
    "with open(path, 'r', encoding='utf-8') as f:\n    lines = f.read().splitlines()\n",
    "try:\n    result = int(text)\nexcept ValueError as exc:\n    raise RuntimeError(f'bad value: {text!r}') from exc\n",
    "def test_parse():\n    assert parse('1 + 2') == 3\n    assert parse('') is None\n",
    "if __name__ == '__main__':\n    main()\n",
    "items = [x * 2 for x in data if x is not None]\nreturn sorted(items, key=lambda x: -x)\n",
)

_SHELL = (
    "ls -la", "cd {d} && ls", "cat {p}", "grep -rn \"{w}\" {d}", "python -m pytest -q tests/",
    "git diff", "git status", "sed -n 1,{n}p {p}", "find . -name \"*.py\" | head", "python {p}",
    "pip list", "echo $PATH", "wc -l {p}", "mkdir -p {d}/build", "rm -rf {d}/__pycache__",
)


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _ident(rng: random.Random) -> str:
    parts = [rng.choice(_WORDS) if rng.random() < 0.5 else _pseudo_word(rng) for _ in range(rng.randint(1, 3))]
    return "_".join(parts)


def _path(rng: random.Random) -> str:
    dirs = [rng.choice(("src", "lib", "tests", "docs", "app", "core", "utils", _pseudo_word(rng)))
            for _ in range(rng.randint(1, 3))]
    ext = rng.choice((".py", ".py", ".md", ".txt", ".json", ".yaml", ".sh", ".toml"))
    return "/".join(dirs) + "/" + _ident(rng) + ext


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) if rng.random() < 0.8 else _pseudo_word(rng) for _ in range(rng.randint(4, 12))]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
    return " ".join(words) + rng.choice((".", ".", ".", "?", "!", ":", ","))


def _arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice(("+", "-", "*", "/"))
    if op == "/":
        b = max(b % 50, 1)
        a = b * rng.randint(0, 99)
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    expr = f"{a} {op} {b}"
    question = rng.choice((f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr} and give the answer."))
    return question, expr, f"The answer is {value}."


def _tool_call(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def _chat(rng: random.Random) -> str:
    kind = rng.randrange(4)
    out = []
    if kind == 0:  # arithmetic with calculator
        tools = [_TOOL_SPECS[0]]
        q, expr, ans = _arith(rng)
        result = ans.removeprefix("The answer is ").rstrip(".")
        turns = [("user", q), ("assistant", _tool_call("calc", {"expr": expr})),
                 ("user", f"<tool_response>\n{result}\n</tool_response>"), ("assistant", ans)]
    elif kind == 1:  # SWE agent
        tools = list(_TOOL_SPECS[1:4])
        p = _path(rng)
        turns = [("user", f"Fix the bug in {p}: {_sentence(rng)}"),
                 ("assistant", _tool_call("view_file", {"path": p})),
                 ("user", "<tool_response>\n" + rng.choice(_PY_SNIPPETS) + "\n</tool_response>"),
                 ("assistant", _tool_call("str_replace", {"path": p, "old_str": "return a + b",
                                                          "new_str": "return a - b"})),
                 ("user", "<tool_response>\nOK\n</tool_response>"),
                 ("assistant", _tool_call("bash", {"command": "python -m pytest -q tests/"}))]
    elif kind == 2:  # browsing agent
        tools = list(_TOOL_SPECS[4:])
        q = _sentence(rng)
        turns = [("user", q), ("assistant", _tool_call("search", {"query": q.rstrip(".?!:,")})),
                 ("user", f"<tool_response>\n[{rng.randint(0, 9)}] {_sentence(rng)}\n</tool_response>"),
                 ("assistant", _tool_call("open", {"id": str(rng.randint(0, 9))})),
                 ("assistant", _tool_call("find", {"pattern": rng.choice(_WORDS)})),
                 ("assistant", _tool_call("answer", {"answer": rng.choice(_WORDS)}))]
    else:  # plain chat
        tools = []
        turns = [("user", _sentence(rng)), ("assistant", "<think>\n" + _sentence(rng) + "\n</think>\n\n" + _sentence(rng))]
    system = "You are a helpful assistant."
    if tools:  # the system turn CHAT_TEMPLATE renders for these tools
        specs = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
        system += (
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            + specs + "\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )
    out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for role, content in turns:
        out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    return "".join(out) + "<|endoftext|>"


def _corpus(seed: int = 0) -> list[str]:
    """The training corpus: a few thousand short documents, identical on every machine."""
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(600):
        docs.append(_chat(rng))
    for _ in range(800):
        q, expr, ans = _arith(rng)
        docs.append(f"{q} {ans}")
    for _ in range(1500):
        docs.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
    for _ in range(300):
        docs.append(rng.choice(_PY_SNIPPETS).replace("path", _ident(rng)))
    for _ in range(400):
        p = _path(rng)
        docs.append("$ " + rng.choice(_SHELL).format(d=p.rsplit("/", 1)[0], p=p, w=rng.choice(_WORDS),
                                                   n=rng.randint(1, 200)))
    return docs


# --------------------------------------------------------------------------------------------
# Build / save
# --------------------------------------------------------------------------------------------


def _train_backend(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None  # exact round trip: never rewrite the text
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..8, in order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    # Training does not cut out added tokens, so split the corpus on them here: they spend no merges.
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [piece for doc in _corpus() for piece in special.split(doc) if piece]
    tok.train_from_iterator(pieces, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
    """Train agentrl's byte-level BPE (deterministic, offline) and wrap it for transformers.

    ``len(result) == vocab_size``; ids ``0..8`` are ``SPECIAL_TOKENS`` in order, then the 256
    byte symbols, then merges. ``vocab_size`` must lie in ``[300, 4096]``.
    """
    if not MIN_VOCAB_SIZE <= int(vocab_size) <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size}")
    backend = _train_backend(int(vocab_size))
    if backend.get_vocab_size() != vocab_size:  # corpus too small for the requested merges
        raise RuntimeError(f"trained vocab has {backend.get_vocab_size()} tokens, wanted {vocab_size}")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer`` into ``out_dir`` (``tokenizer.json`` + ``tokenizer_config.json``).

    Written in the layout every transformers version reads, not only 5.x: the chat template goes
    inline in ``tokenizer_config.json`` (not a separate ``chat_template.jinja``), and the class is
    named ``PreTrainedTokenizerFast`` (5.x's ``TokenizersBackend`` name is unknown to 4.x, e.g.
    the transformers inside SGLang's own venv). 5.x maps that name to the same class.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
