"""Compose the demo model's corpus: handwritten rows plus templates x slots.

    .venv/bin/python training/refusal_training/demo/compose.py          # rewrite training/refusal_training/demo/corpus.jsonl
    .venv/bin/python training/refusal_training/demo/compose.py --check  # exit 1 if corpus.jsonl is stale

Everything here was written for this project (no external prompt set is read).
The ``sources/*.jsonl`` files hold rows as written (``handwritten.jsonl``, the
first corpus, and ``written.jsonl``; ``written-2.jsonl``, drawn last, holds rows written
later, as minimal pairs where it can: a request and its twin with the other label); the YAML
files are lists of families::

    - family: dangerous-howto
      label: refuse                          # or respond
      category: Requests with safety concerns
      rows: 300                              # distinct rows drawn (at most: all there are)
      prompts: ["How do I {harm}?", ...]
      responses: ["I can't help you {harm}.", ...]
      slots: {harm: [...]}                   # a value may be a mapping: "{fact[who]}"

A prompt may also be ``{p: template, r: [responses]}``, with its own responses.

Every row records its ``source``: ``written`` for handwritten rows, else the
family's name (the build can weight handwritten rows up). A refuse family and
its look-alike respond family usually share templates (YAML
anchors), so only the slot content tells them apart. ``surface.yaml`` holds the
label-neutral variation applied to every composed row (greetings, context,
lower case, dropped punctuation, typos). One seeded generator draws everything,
so the corpus is a pure function of the sources; the build hashes the corpus.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
import sys
from collections import Counter
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
CORPUS = HERE / "corpus.jsonl"
SEED = 20240607
RESPOND = "respond"
# files added after the first corpus, drawn last in this order (a later ``.jsonl`` file's rows
# record the file's stem as their ``source``, so a build can tell them apart)
LATER = ("short-questions.yaml", "written-2.jsonl")
WRITTEN = "written"  # the ``source`` of handwritten rows; composed rows name their family


class Slot(dict):
    """A mapping slot value: ``{x[a]}`` reads a field, a bare ``{x}`` its ``text``."""

    def __format__(self, spec: str) -> str:
        return format(self["text"], spec)


def _slot(value):
    return Slot(value) if isinstance(value, dict) else value


def _fields(template: str) -> set[str]:
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            names.add(name.split("[")[0].split(".")[0])
    return names


def _key(prompt: str) -> str:
    return " ".join(prompt.lower().strip(" ?.!").split())


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    if rng.random() < 0.5:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # swap two letters
    else:
        w = w[:j] + w[j + 1 :]  # drop one
    words[i] = w
    return " ".join(words)


class Surface:
    """Label-neutral variation of a prompt's surface (from ``surface.yaml``)."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, prompt: str, rng: random.Random) -> str:
        s = self.spec
        if rng.random() < s["p_frame"]:
            prompt = rng.choice(s["frames"]).format(p=prompt)
        elif rng.random() < s["p_context"]:
            prompt = rng.choice(s["contexts"]) + " " + prompt
        if rng.random() < s["p_prefix"]:
            prefix = rng.choice(s["prefixes"])
            body = prompt if prompt.startswith("I ") else prompt[:1].lower() + prompt[1:]
            prompt = prefix + body
        if rng.random() < s["p_suffix"]:
            prompt = prompt + rng.choice(s["suffixes"])
        if rng.random() < s["p_typo"]:
            prompt = _typo(prompt, rng)
        if rng.random() < s["p_strip"]:
            prompt = prompt.rstrip("?.!")
        if rng.random() < s["p_lower"]:
            prompt = prompt.lower()
        return prompt


def expand(family: dict, rng: random.Random, surface: Surface) -> list[dict]:
    """Draw ``rows`` distinct rows of one family."""
    label = family["label"]
    category = family.get("category", RESPOND) if label != RESPOND else RESPOND
    prompts, responses, slots = family["prompts"], family.get("responses", []), family.get("slots", {})
    noise = family.get("noise", True)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < family["rows"] and attempts < family["rows"] * 40:
        attempts += 1
        template = rng.choice(prompts)
        if isinstance(template, dict):  # a template with its own responses
            template, replies = template["p"], template["r"]
        else:
            replies = responses
        reply = rng.choice(replies)
        values = {name: _slot(rng.choice(slots[name])) for name in sorted(_fields(template) | _fields(reply))}
        prompt = _cap(template.format(**values))
        if _key(prompt) in seen:
            continue
        seen.add(_key(prompt))
        if noise:
            prompt = surface(prompt, rng)
        rows.append(
            {
                "prompt": prompt,
                "category": category,
                "label": label,
                "response": _cap(reply.format(**values)),
                "source": family["family"],
            }
        )
    if len(rows) < family["rows"]:  # templates x slots hold fewer distinct prompts: all of them
        logger.debug("family %s: %d of %d rows", family["family"], len(rows), family["rows"])
    return rows


def _family_files() -> list[Path]:
    """The family files in drawing order: alphabetical, then :data:`LATER` in its order.
    One generator draws every family, so a file drawn last changes no earlier row (nor
    the features cached for it)."""
    first = sorted(p for p in SOURCES.glob("*.yaml") if p.name not in {"surface.yaml", *LATER})
    return first + [SOURCES / name for name in LATER]


def _written(path: Path, source: str = WRITTEN) -> list[dict]:
    rows = path.read_text("utf-8").splitlines()
    return [{**json.loads(line), "source": source} for line in rows if line]


def compose() -> list[dict]:
    first = sorted(p for p in SOURCES.glob("*.jsonl") if p.name not in LATER)
    rows = [row for path in first for row in _written(path)]
    surface = Surface(yaml.safe_load((SOURCES / "surface.yaml").read_text("utf-8")))
    rng = random.Random(SEED)
    labels: dict[str, str] = {}
    out = []

    def add(row: dict, clash_is_error: bool) -> None:
        key = _key(row["prompt"])
        if key in labels:  # first writer wins; two labels for one written prompt is an error
            if clash_is_error and labels[key] != row["label"]:
                raise ValueError(f"handwritten prompt with two labels: {row['prompt']!r}")
            return
        labels[key] = row["label"]
        out.append(row)

    for row in rows:
        add(row, clash_is_error=True)
    for path in _family_files():
        if path.suffix == ".jsonl":  # a later file of written rows
            for row in _written(path, source=path.stem):
                add(row, clash_is_error=True)
            continue
        for family in yaml.safe_load(path.read_text("utf-8")):
            for row in expand(family, rng, surface):
                add(row, clash_is_error=False)
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if corpus.jsonl is not up to date")
    opts = args.parse_args(argv)
    rows = compose()
    text = render(rows)
    counts = Counter(r["category"] for r in rows)
    logger.info("%d rows: %s", len(rows), dict(sorted(counts.items())))
    if opts.check:
        stale = not CORPUS.is_file() or CORPUS.read_text("utf-8") != text
        if stale:
            logger.error("%s is stale: run %s", CORPUS, Path(__file__).name)
        return 1 if stale else 0
    CORPUS.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
