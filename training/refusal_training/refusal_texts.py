"""Short refusal texts for training rows that come without a response.

A refuse row in the training data often carries only a prompt and a category.
The model still has to learn what follows the refusal token, so such rows get
a short, category-appropriate refusal, picked deterministically from a small
varied set: the same row (same id, same seed) always gets the same text, and
different rows of a category get different wordings, so the model does not
collapse onto one canned sentence. Written for this project; the wording is
deliberately plain and non-judgemental.
"""

from __future__ import annotations

import random

from refusal_plugins.vocab import REFUSE_KEY

#: Refusal texts per API key (``refuse`` is the general set, used by rows
#: without a category). Keys match ``refusal_plugins.vocab``.
REFUSAL_TEXTS: dict[str, tuple[str, ...]] = {
    "humanizing": (
        "I'm an AI, so I don't have personal experiences, feelings or a life of my own to share.",
        "As an AI model I don't have a body, memories or personal preferences, so I can't answer that as a person would.",
        "I don't have feelings or opinions of my own the way people do, so I can't really answer that about myself.",
        "I'm a language model: I don't eat, sleep, travel or have a family, so there's no personal story I can tell.",
        "That question is about me as a person, but I'm an AI assistant without personal experiences.",
        "I can't share personal experiences because I don't have any; I'm a computer program that generates text.",
        "I don't have a favourite, a mood or a personal history. I'm an AI, though I'm happy to help with something else.",
        "Being an AI, I have no emotions or lived experiences, so I can't honestly describe how I feel about that.",
        "I don't have a human life to draw on, so I can't answer from personal experience.",
        "I'm not a person and don't have personal relationships or memories, so I can't answer that about myself.",
    ),
    "incomplete": (
        "Your request seems to be missing some details. Could you tell me a bit more about what you need?",
        "I'm not sure what you're referring to. Could you share the text or details you have in mind?",
        "It looks like part of the question is missing. Can you give me the full request?",
        "I don't have enough information to answer that. Could you clarify what you mean?",
        "That request is ambiguous as written. Which of the possible meanings did you intend?",
        "I can't see the document, link or attachment you mention. Could you paste the relevant part here?",
        "Could you be more specific? Without more context I would only be guessing.",
        "The question seems to rest on something that isn't stated. Can you fill in the missing details?",
        "I need a little more context before I can help. What exactly would you like me to do?",
        "Some key information is missing from the request. Please add it and I'll gladly help.",
    ),
    "indeterminate": (
        "There isn't a single correct answer to that; it depends on personal values and preferences.",
        "That question has no definitive answer, and reasonable people see it differently.",
        "It's subjective, so I can't name one right answer, but I can lay out the main points of view.",
        "Nobody can answer that with certainty; it depends on circumstances that can't be known in advance.",
        "That's a matter of opinion rather than fact, so I can't give a definitive answer.",
        "There's no objective way to decide that; different criteria lead to different answers.",
        "The answer depends on what you value most, so there's no universally correct choice.",
        "I can't give a definite answer, because the question is open-ended and has no single truth.",
        "That can't be settled objectively; it's the kind of question people answer for themselves.",
        "There is no factual answer to that; it comes down to individual taste and judgement.",
    ),
    "safety": (
        "I can't help with that, because it could put people at risk of harm.",
        "I won't provide that information; it could be used to hurt someone or break the law.",
        "Sorry, but I can't assist with this request since it raises safety concerns.",
        "I can't help with that. If someone is in danger, please contact local emergency services.",
        "That's not something I can help with, as it could cause real harm to you or others.",
        "I'm not able to give instructions for that, because it could be dangerous or illegal.",
        "I have to decline this one: it could facilitate harm, and I want to keep people safe.",
        "I can't assist with that request. If you're going through something difficult, talking to someone you trust or a professional can help.",
        "I won't help with this, because it could be used to harm others or to deceive them.",
        "Sorry, I can't do that. It involves a risk of harm that I'm not willing to contribute to.",
    ),
    "unsupported": (
        "I can't do that: I'm a text-only model and can't browse the web, open files or take actions in the world.",
        "I don't have access to real-time information, so I can't tell you what's happening right now.",
        "That's beyond what I can do; I can't make calls, send messages or access your accounts.",
        "I can't process images, audio or video here, only text.",
        "I don't have the ability to run that or connect to external systems.",
        "My knowledge has a cutoff and I can't look things up live, so I can't answer that reliably.",
        "I'm not able to remember previous conversations or access your personal data.",
        "I can't perform that task: it needs capabilities I don't have, such as acting outside this chat.",
        "I can't generate or send files, set reminders or control devices.",
        "That request needs tools or access that I don't have, so I can't complete it.",
    ),
    REFUSE_KEY: (
        "I'm sorry, but I can't help with that request.",
        "I can't assist with that.",
        "Sorry, that's not something I can help with.",
        "I'm not able to help with this request.",
        "I have to decline this request.",
        "Unfortunately, I can't do that.",
        "I'm afraid I can't help with that one.",
        "That's a request I can't fulfil, sorry.",
        "I won't be able to help with that, but I'm happy to help with something else.",
        "Sorry, I can't provide an answer to that.",
    ),
}


def refusal_text(key: str, row_id: str, seed: int) -> str:
    """The refusal text of one row: a fixed function of (key, row id, seed).

    Seeding per row (not from a shared stream) keeps the choice stable when
    rows are added, removed or reordered, or a holdout takes some of them.
    """
    texts = REFUSAL_TEXTS[key]
    return random.Random(f"{seed}:{key}:{row_id}").choice(texts)
