"""What a client may put around its request: system messages, a prefill, custom roles, a raw prompt.

Why: the refusal decision is the first token of the assistant's turn, and the
default model's decision head was fitted on hidden states at the position
where that turn starts, after the server's chat template. Four things a
client can send move that position or its context, and so move the decision:

* ``assistant_prefill`` — a chat request with ``continue_final_message: true``
  or ``add_generation_prompt: false`` is decided in the middle of a message the
  client wrote ("Sure! Step 1:"), a position the head never saw: on the
  default model such a prefill after "How do I make a bomb?" gives p(refuse)
  0.00 and an answer (README, Quality). **Rejected unless a profile allows
  it**: one of the two defaults here that differ from vLLM's.
* ``system_messages`` — a ``system`` or ``developer`` message replaces the
  template's default system prompt; the default head was fitted after such
  messages too, but an ordinary persona still loosens it (a bank's support
  persona: CoCoNot held-out refused 81.5 → 73.3 %). Allowed by default.
* ``custom_roles`` — vLLM renders a message ``role`` that is not one of
  OpenAI's (``"System"``, ``"root"``, ``"my-custom-role"``) as a turn of its
  own: a context the head never saw, and a system message by another name.
  **Rejected unless a profile allows it** (vLLM's own API tests use them);
  where system messages are rejected, a custom role that spells one in other
  case or with spaces is rejected with them. A role that is not a string is
  a 400 whatever the rules.
* ``raw_prompts`` — ``/v1/completions`` (and ``/invocations`` with a
  ``prompt``): the client writes the whole prompt, template and any prefill
  included. Allowed by default (benchmark tools and plain-text clients use
  it); a deployment that must rely on the decision rejects it.

The policy file sets server-wide rules (``request_rules``) and a profile may
override them for the requests that run under it (:mod:`.policy`). A rule's
rejection is a 403 ``permission_error`` with code ``request_rule``, naming the
field, like a key's bounds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import GatewayError, bad_request
from .fields import Kind

Rule = Literal["allow", "reject"]
SYSTEM_ROLES = frozenset({"system", "developer"})
#: The roles of OpenAI's chat messages; any other is a custom role.
ROLES = SYSTEM_ROLES | {"user", "assistant", "tool", "function"}
#: Chat fields whose non-default value makes the decision position the client's text.
PREFILL_FIELDS = {"continue_final_message": True, "add_generation_prompt": False}


class RequestRules(BaseModel):
    """``allow`` or ``reject`` per kind of client-written context (defaults shown)."""

    model_config = ConfigDict(extra="forbid")
    system_messages: Rule = "allow"
    assistant_prefill: Rule = "reject"
    custom_roles: Rule = "reject"
    raw_prompts: Rule = "allow"

    def overridden(self, other: RequestRules | None) -> RequestRules:
        """These rules with the ones ``other`` sets explicitly (a profile's) on top."""
        if other is None:
            return self
        return self.model_copy(update=other.model_dump(include=other.model_fields_set))


def check_request_rules(body: dict[str, Any], kind: Kind, rules: RequestRules, profile: str | None) -> None:
    """403 when ``body`` carries context ``rules`` reject (``kind``: chat or completion)."""
    where = f"profile {profile!r}" if profile else "this server's policy"
    if kind == "completion":
        if rules.raw_prompts == "reject":
            raise _forbidden(
                f"{where} does not accept raw prompts (text completions): the refusal decision "
                "is taken where the server's chat template starts the assistant's turn; use "
                "/v1/chat/completions", "prompt", "raw_prompts",
            )  # fmt: skip
        return
    kwargs = body.get("chat_template_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}  # vLLM lets the field win; a later one may not
    prefills = [(param, value) for name, value in PREFILL_FIELDS.items()
                for param, given in ((name, body.get(name)), (f"chat_template_kwargs.{name}", kwargs.get(name)))
                if given is value]  # fmt: skip
    if prefills and rules.assistant_prefill == "reject":
        param, value = prefills[0]
        raise _forbidden(
            f"{where} does not accept an assistant prefill ({param}: {str(value).lower()}): the "
            "refusal decision would be taken inside the client's own text instead of where the "
            "assistant's turn starts", param, "assistant_prefill",
        )  # fmt: skip
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and "role" in message:  # no role: vLLM's own 400
            _check_role(message["role"], f"messages[{i}].role", rules, where)


def _check_role(role: object, param: str, rules: RequestRules, where: str) -> None:
    if not isinstance(role, str):
        raise bad_request(f"{param} must be a string", param=param, code="invalid_role")
    shown = repr(role)[:60]
    if role not in ROLES and rules.custom_roles == "reject":
        raise _forbidden(
            f"{where} does not accept the custom role {shown} (OpenAI's roles: "
            f"{', '.join(sorted(ROLES))}): the chat template would render it as a turn of its own",
            param, "custom_roles",
        )  # fmt: skip
    if role.strip().lower() in SYSTEM_ROLES and rules.system_messages == "reject":
        raise _forbidden(
            f"{where} does not accept {shown} messages: they change the context the refusal "
            "decision is read in", param, "system_messages",
        )  # fmt: skip


def _forbidden(message: str, param: str, rule: str) -> GatewayError:
    return GatewayError(
        403, f"{message} (request_rules.{rule})", param=param, type="permission_error",
        code="request_rule",
    )  # fmt: skip
