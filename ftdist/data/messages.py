"""A chat row's messages and tools, checked and normalised into what a chat template receives.

Each malformed message, tool call, tool result or tool list is a BadRow of its own kind
(bad_message, bad_tool_call, bad_tool_arguments, unknown_tool, bad_tool_result, bad_tools), so a
report counts them apart. Only the keys a template reads pass through: a row's extra keys cannot
change its rendering.
"""

from __future__ import annotations

import json
from typing import Any

from ftdist.data.sources import BadRow

ROLES = ("system", "user", "assistant", "tool")
# Names datasets use for an assistant's reasoning; transformers reads all three the same way.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def row_field(row: dict, name: str) -> Any:
    """row[name], or BadRow missing_field naming the fields the row has."""
    if name not in row or row[name] is None:
        fields = ", ".join(map(str, row)) or "none"
        raise BadRow("missing_field", f"row has no field '{name}' (fields: {fields})")
    return row[name]


def conversation(messages: Any, tools: Any, messages_field: str, system_prompt: str | None) -> tuple[list, list | None]:
    """The row's messages and tools as the template receives them, or BadRow."""
    if not isinstance(messages, list):
        raise BadRow("wrong_type", f"field '{messages_field}' must be a list of messages, got {type_name(messages)}")
    tools = _tools(tools)
    names = {t["function"]["name"] for t in tools} if tools else None
    checked = [_message(m, i, names) for i, m in enumerate(messages)]
    _check_tool_results(checked)
    if system_prompt and not any(m["role"] == "system" for m in checked):
        checked.insert(0, {"role": "system", "content": system_prompt})
    return checked, tools


def _message(message: Any, index: int, tool_names: set[str] | None) -> dict:
    where = f"message {index + 1}"
    if not isinstance(message, dict):
        raise BadRow("bad_message", f"{where} is a {type_name(message)}, not an object with role and content")
    role = message.get("role")
    if role is None:
        raise BadRow("bad_message", f"{where} has no 'role'")
    if role not in ROLES:
        raise BadRow("bad_message", f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise BadRow("bad_tool_call", f"{where} has tool_calls but role {role!r}; only assistant messages call tools")
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls, where, tool_names)
    content = _content(message.get("content"), where, role)
    if content is None and "tool_calls" not in out:
        raise BadRow("bad_message", f"{where} has no 'content'" + (" and no tool_calls" if role == "assistant" else ""))
    if content is not None:
        out["content"] = content
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise BadRow("bad_message", f"{where}: reasoning must be a string on an assistant message")
        out["reasoning_content"] = reasoning
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = str(message[key])
    # Only these keys reach the template, so a row's extra keys cannot change the rendering.
    return out


def _content(content: Any, where: str, role: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts; text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise BadRow("bad_message", f"{where} has a content part of type {kind!r}; only text parts are read")
            texts.append(part["text"])
        return "".join(texts)
    if role == "tool" and isinstance(content, dict):
        return json.dumps(content, ensure_ascii=False)  # a structured tool result, rendered as its JSON
    raise BadRow("bad_message", f"{where} content must be a string, got {type_name(content)}")


def _tools(tools: Any) -> list | None:
    """A row's tool list as JSON-schema function specs ({"type": "function", "function": {...}})."""
    if tools is None:
        return None
    if isinstance(tools, str):  # datasets often store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow("bad_tools", f"the tools string is not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(tools, list):
        raise BadRow("bad_tools", f"tools must be a list of function specs, got {type_name(tools)}")
    out = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise BadRow("bad_tools", f"tool {i + 1} has no function name")
        out.append({"type": "function", "function": spec})
    return out or None


def _tool_calls(calls: Any, where: str, tool_names: set[str] | None) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise BadRow("bad_tool_call", f"{where}: tool_calls must be a non-empty list, got {type_name(calls)}")
    out = []
    for n, call in enumerate(calls, 1):
        at = f"{where} tool call {n}"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow("bad_tool_call", f"{at} has no function name")
        if tool_names is not None and fn["name"] not in tool_names:
            raise BadRow("unknown_tool", f"{at} calls {fn['name']!r}, which is not in the row's tools "
                                         f"({', '.join(sorted(tool_names))})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise BadRow("bad_tool_arguments", f"{at} ({fn['name']}): arguments are not valid JSON: "
                                                   f"{e.msg} (column {e.colno})") from None
        if not isinstance(args, dict):
            raise BadRow("bad_tool_arguments", f"{at} ({fn['name']}): arguments must be a JSON object, "
                                               f"got {type_name(args)}")
        # Templates serialize arguments themselves (`| tojson`); a dict renders once, not as a string in a string.
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            normal["id"] = str(call["id"])
        out.append(normal)
    return out


def _check_tool_results(messages: list[dict]) -> None:
    """Each tool message answers a call of the assistant message before its run of tool messages."""
    calls: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            calls = m.get("tool_calls", [])
        elif m["role"] == "tool":
            if not calls:
                raise BadRow("bad_tool_result", f"message {i + 1} is a tool result with no assistant tool call before it")
            ids = {c["id"] for c in calls if "id" in c}
            if "tool_call_id" in m and ids and m["tool_call_id"] not in ids:
                raise BadRow("bad_tool_result", f"message {i + 1} answers tool_call_id {m['tool_call_id']!r}, "
                                                f"which no call before it has ({', '.join(sorted(ids))})")
        else:
            calls = []
