"""The refusal vocabulary shared by the engine plugins and the gateway.

Everything that names a control token lives here: the stable API keys
(``safety``, ``incomplete``, ...), the paper's token strings, and the
manifest that a refusal-token model carries next to its weights. The manifest
is the single source of truth for token ids, so no other module hard-codes
them. Pure Python on purpose: the gateway imports it without pulling in torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MANIFEST_FILE = "refusal_manifest.json"

RESPOND_KEY = "respond"
#: The general refusal key: the one category of a binary model, and "every
#: refusal category at once" for a categorical model.
REFUSE_KEY = "refuse"

#: Stable API key -> CoCoNot category name (the token text is ``[<name>]``).
COCONOT_CATEGORIES: dict[str, str] = {
    "humanizing": "Humanizing requests",
    "incomplete": "Incomplete requests",
    "indeterminate": "Indeterminate requests",
    "safety": "Requests with safety concerns",
    "unsupported": "Unsupported requests",
}

#: CoCoNot category name -> stable API key (data files name categories; the API uses keys).
KEY_OF_CATEGORY: dict[str, str] = {name: key for key, name in COCONOT_CATEGORIES.items()}

#: Every refusal key a request may name, for any scheme.
ALL_REFUSAL_KEYS: frozenset[str] = frozenset({REFUSE_KEY, *COCONOT_CATEGORIES})

Scheme = Literal["binary", "categorical"]


def default_token_text(key: str) -> str:
    """The paper's token string for a key (``[respond]``, ``[Requests with ...]``)."""
    if key in (RESPOND_KEY, REFUSE_KEY):
        return f"[{key}]"
    return f"[{COCONOT_CATEGORIES[key]}]"


def scheme_keys(scheme: Scheme) -> list[str]:
    """Control-token keys of a scheme, ``respond`` first, in manifest order."""
    if scheme == "binary":
        return [RESPOND_KEY, REFUSE_KEY]
    return [RESPOND_KEY, *sorted(COCONOT_CATEGORIES)]


@dataclass(frozen=True)
class ControlToken:
    """One control token of a model: API key, token text and vocabulary id."""

    key: str
    text: str
    id: int
    category: str | None  # CoCoNot category name; None for respond / binary refuse


@dataclass(frozen=True)
class RefusalManifest:
    """What a refusal-token model declares about its control tokens."""

    scheme: Scheme
    tokens: tuple[ControlToken, ...]
    version: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        keys = [t.key for t in self.tokens]
        if keys != scheme_keys(self.scheme):
            raise ValueError(
                f"manifest tokens {keys} do not match scheme {self.scheme!r} "
                f"(expected {scheme_keys(self.scheme)})"
            )
        if len({t.id for t in self.tokens}) != len(self.tokens):
            raise ValueError("manifest control-token ids must be distinct")

    @classmethod
    def build(
        cls,
        scheme: Scheme,
        texts_by_key: dict[str, str],
        ids_by_key: dict[str, int],
        extra: dict | None = None,
    ) -> RefusalManifest:
        """The manifest of a scheme from each key's token text and id.

        Tokens come in manifest order (``respond`` first) whatever the order
        of the mappings; each refusal category gets its CoCoNot name. Both
        mappings must have exactly the scheme's keys.
        """
        keys = scheme_keys(scheme)
        for what, mapping in (("token texts", texts_by_key), ("token ids", ids_by_key)):
            if set(mapping) != set(keys):
                raise ValueError(
                    f"{what} for keys {sorted(mapping)} do not match scheme {scheme!r} "
                    f"(expected {keys})"
                )
        tokens = tuple(
            ControlToken(
                key=key,
                text=texts_by_key[key],
                id=ids_by_key[key],
                category=COCONOT_CATEGORIES.get(key),
            )
            for key in keys
        )
        return cls(scheme=scheme, tokens=tokens, extra=dict(extra or {}))

    # -- lookups -------------------------------------------------------------
    @property
    def respond(self) -> ControlToken:
        return self.tokens[0]

    @property
    def refusal_tokens(self) -> tuple[ControlToken, ...]:
        """The refusal categories (every token but ``respond``)."""
        return self.tokens[1:]

    @property
    def refusal_keys(self) -> list[str]:
        return [t.key for t in self.refusal_tokens]

    @property
    def accepted_keys(self) -> frozenset[str]:
        """Keys a request may use: the categories plus the general ``refuse``."""
        return frozenset({REFUSE_KEY, *self.refusal_keys})

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def by_text(self) -> dict[str, ControlToken]:
        return {t.text: t for t in self.tokens}

    def by_id(self) -> dict[int, ControlToken]:
        return {t.id: t for t in self.tokens}

    @property
    def dtype(self) -> str | None:
        """The precision the model asks to be served in (``"dtype"`` in the manifest).

        The kit's models declare float32: their decision heads were fitted and
        measured in it, and vLLM would otherwise serve a float32 checkpoint in
        its platform default (bfloat16 on CPU, slower there and not the precision
        of the figures). ``None`` leaves the choice to vLLM.
        """
        value = self.extra.get("dtype")
        return value if isinstance(value, str) and value else None

    # -- persistence ---------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": self.version,
            "scheme": self.scheme,
            "tokens": [
                {"key": t.key, "text": t.text, "id": t.id, "category": t.category}
                for t in self.tokens
            ],
            **self.extra,
        }

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict) -> RefusalManifest:
        known = {"version", "scheme", "tokens"}
        return cls(
            scheme=data["scheme"],
            version=int(data.get("version", 1)),
            tokens=tuple(
                ControlToken(
                    key=t["key"], text=t["text"], id=int(t["id"]), category=t.get("category")
                )
                for t in data["tokens"]
            ),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> RefusalManifest:
        """Read ``refusal_manifest.json`` from a model directory.

        Raises ``FileNotFoundError`` with a hint when the model is not a
        refusal-token model (``refusal-gateway train`` writes the manifest).
        """
        path = Path(model_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {model_dir} is not a refusal-token model "
                "(build one with `refusal-gateway train`)"
            )
        return cls.from_json(json.loads(path.read_text()))
