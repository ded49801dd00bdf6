"""Fashion-MNIST class names, and reading a class from a prompt: case-insensitive, plurals and common
synonyms fine ("Sneakers", "a pair of jeans", "an ankle boot"); empty means unconditional."""
from __future__ import annotations

import re

from core.contracts import NULL_CLASS

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")  # index = class id, as in the dataset

# Phrases (singular, lower case, words separated by one space) naming each class, beyond its own name.
_SYNONYMS = {
    0: ("t-shirt", "t shirt", "tshirt", "tee", "tee shirt", "top", "t-shirt top", "t shirt top"),
    1: ("pants", "jeans", "slacks"),
    2: ("sweater", "jumper", "sweatshirt"),
    3: ("gown", "frock"),
    4: ("jacket", "parka", "overcoat"),
    5: ("flip-flop", "flip flop"),
    6: ("blouse", "button-up shirt", "dress shirt"),
    7: ("trainer", "running shoe", "tennis shoe"),
    8: ("handbag", "purse", "tote", "backpack"),
    9: ("boot", "ankle-boot", "bootie"),
}
_FILLER = {"a", "an", "the", "one", "some", "pair", "of", "pairs", "image", "picture", "photo"}


def _normalize(text: str) -> str:
    """Lower case, '/' and punctuation to spaces (keeping '-'), filler words dropped, one space between."""
    words = re.sub(r"[^a-z0-9\- ]+", " ", text.lower().replace("/", " ")).split()
    return " ".join(w for w in words if w not in _FILLER)


def _singular(phrase: str) -> str:
    """The phrase with its last word singular: 'ankle boots' -> 'ankle boot', 'dresses' -> 'dress'."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("sses", "shes", "ches")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith("ss") and len(last) > 3:
        last = last[:-1]
    return f"{head} {last}".strip()


_PHRASES: dict[str, int] = {}
for _cid, _name in enumerate(CLASS_NAMES):
    for _phrase in (_name, *_SYNONYMS[_cid]):
        _PHRASES[_normalize(_phrase)] = _cid


def _lookup(phrase: str) -> int | None:
    cid = _PHRASES.get(phrase)
    return cid if cid is not None else _PHRASES.get(_singular(phrase))


def class_list() -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(CLASS_NAMES))


def class_from_prompt(prompt: str) -> int:
    """The class id a prompt names, NULL_CLASS for an empty prompt. Raises ValueError (naming the classes)
    when it names none, or more than one."""
    text = _normalize(prompt)
    if not text:
        return NULL_CLASS
    if (whole := _lookup(text)) is not None:
        return whole
    # a longer prompt: the classes its words name, longest phrase first so "ankle boot" beats "boot"
    words = text.split()
    found: set[int] = set()
    i = 0
    while i < len(words):
        for size in (3, 2, 1):
            cid = _lookup(" ".join(words[i:i + size])) if i + size <= len(words) else None
            if cid is not None:
                found.add(cid)
                i += size
                break
        else:
            i += 1
    if len(found) == 1:
        return found.pop()
    if found:
        names = ", ".join(CLASS_NAMES[c] for c in sorted(found))
        raise ValueError(f"prompt {prompt!r} names more than one class ({names}); name one of: {class_list()}")
    raise ValueError(f"prompt {prompt!r} names no Fashion-MNIST class; name one of: {class_list()} "
                     "(or leave it empty for any class)")
