"""Writes the endpoint reference of docs/api.md from the OpenAPI document the
router serves (services/router/openapi.py); a test fails when it is stale.

Only the text between the markers is generated; the introduction (auth,
errors, paging, limits) around them is written by hand.

Usage: python scripts/gen_api_docs.py [--check]
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.router import openapi  # noqa: E402

TARGET = ROOT / "docs" / "api.md"
START = "<!-- generated:start -->"
END = "<!-- generated:end -->"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if schema.get("type") == "array":
        return _type(schema["items"]) + "[]"
    if "allOf" in schema:
        return " + ".join(_type(s) for s in schema["allOf"])
    if schema.get("type") == "object" and "additionalProperties" in schema and not schema.get("properties"):
        extra = schema["additionalProperties"]
        if isinstance(extra, dict):
            return f"object of {_type(extra)}"
    return str(schema.get("type", "object"))


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    if "default" in schema:
        parts.append(f"default `{str(schema['default']).lower() if isinstance(schema['default'], bool) else schema['default']}`")
    if "minimum" in schema:
        parts.append(f"≥ {schema['minimum']}")
    if "maximum" in schema:
        parts.append(f"≤ {schema['maximum']}")
    if schema.get("minLength"):
        parts.append("non-empty")
    return ", ".join(parts)


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", op["summary"].rstrip(".") + ".", ""]
    if op.get("security") == []:
        lines += ["No API key needed.", ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
        for p in params:
            lines.append(f"| `{p['name']}` | {p['in']} | {_type(p['schema'])} | "
                         f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |")
        lines.append("")
    body = op.get("requestBody")
    if body is not None:
        schema = body["content"]["application/json"]["schema"]
        props = schema.get("properties", {})
        if props:
            lines += [f"Request body (JSON{'' if body.get('required') else ', optional'}; unknown fields are a 400):",
                      "", "| field | type | required | constraints | description |",
                      "| --- | --- | --- | --- | --- |"]
            required = set(schema.get("required", []))
            for name, field in props.items():
                lines.append(f"| `{name}` | {_type(field)} | {'yes' if name in required else 'no'} | "
                             f"{_constraints(field)} | {_cell(field.get('description', ''))} |")
        else:
            lines.append("Request body: none (an empty JSON object is accepted).")
        lines.append("")
    lines += ["| status | response |", "| --- | --- |"]
    for code, response in op["responses"].items():
        content = response.get("content", {}).get("application/json", {}).get("schema")
        what = _cell(response["description"])
        if content is not None and code == "200" and "$ref" in content:
            what = f"{what}: {_type(content)}"
        if "headers" in response:
            what += " (header " + ", ".join(f"`{h}`" for h in response["headers"]) + ")"
        lines.append(f"| {code} | {what} |")
    lines.append("")
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [schema["description"][0].upper() + schema["description"][1:] + ".", ""]
    if "allOf" in schema:
        parts = [s for s in schema["allOf"] if "$ref" in s]
        lines += ["Every field of " + ", ".join(_type(s) for s in parts) + ", and:", ""]
        schema = next(s for s in schema["allOf"] if "$ref" not in s)
    lines += ["| field | type | description |", "| --- | --- | --- |"]
    for field, sub in schema.get("properties", {}).items():
        kind = _type(sub)
        if sub.get("type") == "object" and sub.get("properties"):
            kind = "object {" + ", ".join(f"{k}: {_type(v)}" for k, v in sub["properties"].items()) + "}"
        lines.append(f"| `{field}` | {kind} | {_cell(sub.get('description', ''))} |")
    lines.append("")
    return lines


def render() -> str:
    doc = openapi.document()
    lines = [
        START,
        "<!-- Generated from the OpenAPI document by `python scripts/gen_api_docs.py`; do not edit by hand. -->",
        "",
        "## Endpoints",
        "",
    ]
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            lines += _operation(method, path, op)
    lines += ["## Schemas", ""]
    for name, schema in doc["components"]["schemas"].items():
        lines += _schema(name, schema)
    lines.append(END)
    return "\n".join(lines)


def rewrite(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{TARGET} lacks the markers {START} / {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


if __name__ == "__main__":
    current = TARGET.read_text()
    fresh = rewrite(current)
    if "--check" in sys.argv:
        sys.exit(0 if current == fresh else 1)
    TARGET.write_text(fresh)
    print(f"wrote {TARGET}", file=sys.stderr)
