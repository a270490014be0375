"""A word-level tokenizer for tiny test models, written into a model folder (nothing downloaded):
id i is the word `w<i>`, except 0-5: <unk>, <s>, </s>, user, assistant, system. Text is words
joined by spaces, so a text and its ids map one to one; the chat template writes
`<role> <content> ` per message, then `assistant`."""

from __future__ import annotations

import json
import os

SPECIAL = ("<unk>", "<s>", "</s>", "user", "assistant", "system")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def word(i: int) -> str:
    return SPECIAL[i] if i < len(SPECIAL) else f"w{i}"


def text_of(ids) -> str:
    """What the tokenizer decodes ids to (special tokens <unk>, <s>, </s> skipped)."""
    return " ".join(word(i) for i in ids if i not in (0, 1, 2))


def write_tokenizer(folder, vocab: int, *, chat: bool = True) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>"}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
