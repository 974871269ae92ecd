"""Structured output and the task's decoding through the server (runtime/server/decoding.py).

A bundle whose manifest carries a json task answers bare chats with schema-valid JSON (the tiny
random model never writes JSON on its own, so validity is the grammar's doing); response_format
json_object / json_schema works for any bundle, ``text`` opts out; the ONNX backend accepts the
same requests unconstrained and says so; bad schemas are 400s naming response_format; the
openai SDK's response_format reaches a real ``edgepack serve`` process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edgepack.answers import JsonAnswer
from edgepack.runtime.server.api import HttpReject, parse_request
from edgepack.runtime.server.decoding import STRUCTURED_HEADER
from edgepack.runtime.server.serve import ServeConfig, make_server
from edgepack.runtime.session import open_model
from edgepack.task import Decoding, Task
from tests.runtime.helpers import task_bundle
from tests.runtime.server.helpers import USER, call, chat, local  # noqa: F401 - fixtures are requested by name

SCHEMA = {"type": "object",
          "properties": {"asset": {"type": "string", "maxLength": 12},
                         "priority": {"enum": ["low", "medium", "high"]},
                         "hours": {"type": "integer"}},
          "required": ["asset", "priority", "hours"], "additionalProperties": False}
OTHER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
         "required": ["ok", "n"], "additionalProperties": False}
JSON_TASK = Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset", "priority", "hours")),
                 system_prompt="Extract the work order as JSON.", decoding=Decoding(max_tokens=160))
PROMPTS = ["Compressor C-12 tripped on high vibration.", "Pump P-101 discharge pressure low alarm.",
           "PLC rack 2 lost Profinet communication."]


def as_schema(schema: dict[str, Any], name: str = "workorder", **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


def gguf_bundle(tiny_gguf: Path, path: Path, task: Task | None) -> Path:
    return task_bundle(tiny_gguf, path, task, n_ctx=512)


def onnx_bundle(folder: Path, path: Path, task: Task) -> Path:
    from edgepack.export.pack.pack import onnx_folder_files
    from edgepack.runtime.bundle.archive import write_bundle

    manifest = {"schema_version": 1, "model": "tiny", "format": "onnx", "quant": "fp32", "profile": {"name": "t"},
                "entrypoint": f"{folder.name}/model.onnx", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": 512, "threads": 1}, "task": task.to_json()}
    write_bundle(path, manifest, onnx_folder_files(folder))
    return path


def content(reply: Any) -> str:
    assert reply.status == 200, reply.body
    return reply.json()["choices"][0]["message"]["content"]


# --- parsing: OpenAI's shapes, and what is refused before the model is asked -------------------
@pytest.mark.parametrize("value,kind", [
    ({"type": "text"}, "text"),
    ({"type": "json_object"}, "json_object"),
    (as_schema(SCHEMA), "json_schema"),
    (as_schema(SCHEMA, strict=True, description="a work order"), "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "any-object_1"}}, "json_schema"),
])
def test_response_format_shapes_parse(value: dict[str, Any], kind: str) -> None:
    req = parse_request({"messages": USER, "response_format": value}, "chat")
    assert req.response_format is not None and req.response_format.type == kind
    if kind == "text":
        assert req.response_format.schema is None
    else:
        assert req.response_format.schema == value.get("json_schema", {}).get("schema", {"type": "object"})


@pytest.mark.parametrize("value,message", [
    ({"type": "xml"}, "type is one of text, json_object, json_schema"),
    ("json", "must be an object"),
    ({"type": "json_object", "schema": {}}, "takes no field"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name is required"),
    (as_schema(SCHEMA, name="has space"), "name is required"),
    (as_schema(SCHEMA, name="x" * 65), "name is required"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}, "must be a JSON Schema object"),
    (as_schema(SCHEMA, strict="yes"), "strict must be a boolean"),
    (as_schema(SCHEMA, grammar="root ::= x"), "unsupported field"),
])
def test_bad_response_format_shapes_are_400s(value: Any, message: str) -> None:
    with pytest.raises(HttpReject, match=message) as caught:
        parse_request({"messages": USER, "response_format": value}, "chat")
    assert caught.value.status == 400 and caught.value.param == "response_format"


@pytest.mark.parametrize("value,ok", [(1.1, True), (1, True), (0.5, True), (10, True), (0, False), (-1, False),
                                      (10.5, False), ("1.1", False), (True, False)])
def test_repeat_penalty_is_an_extension_field(value: Any, ok: bool) -> None:
    body = {"messages": USER, "repeat_penalty": value}
    if ok:
        assert parse_request(body, "chat").repeat_penalty == float(value)
        assert parse_request({"prompt": "x", "repeat_penalty": value}, "completion").repeat_penalty == float(value)
    else:
        with pytest.raises(HttpReject, match="repeat_penalty"):
            parse_request(body, "chat")


def test_left_out_fields_are_none_for_the_task_to_fill() -> None:
    req = parse_request({"messages": USER}, "chat")
    assert (req.max_tokens, req.temperature, req.repeat_penalty, req.stop, req.response_format) == \
        (None, None, None, None, None)


# --- a json task's bundle on llama.cpp ---------------------------------------------------------
@pytest.fixture()
def json_server(tiny_gguf: Path, tmp_path: Path, cache_dir: Path, local: Any) -> Any:
    return local(gguf_bundle(tiny_gguf, tmp_path / "tiny-json.edgepack", JSON_TASK))


def test_a_json_tasks_bundle_answers_schema_valid_json(json_server: Any, tiny_gguf: Path, tmp_path: Path) -> None:
    for text in PROMPTS:
        reply = chat(json_server.port, messages=[{"role": "user", "content": text}])
        jsonschema.validate(json.loads(content(reply)), SCHEMA)
        assert reply.headers[STRUCTURED_HEADER.lower()] == "constrained"
        meta = reply.json()["edgepack"]["structured_output"]
        assert meta == {"requested_by": "task", "type": "json_schema", "constrained": True, "unenforced": [],
                        "note": None}
    # The same answer as the session gives (run/chat): system prompt, decoding and schema from the task.
    with open_model(tmp_path / "tiny-json.edgepack", threads=1) as session:
        messages, decoding, schema = session.apply_task([{"role": "user", "content": PROMPTS[0]}])
        expected = "".join(session.answer(messages, decoding, schema))
    assert content(chat(json_server.port, messages=[{"role": "user", "content": PROMPTS[0]}])) == expected
    streamed = chat(json_server.port, messages=[{"role": "user", "content": PROMPTS[0]}], stream=True)
    assert streamed.headers[STRUCTURED_HEADER.lower()] == "constrained"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed.events()[:-1])
    assert text == expected


def test_response_format_overrides_the_tasks_schema(json_server: Any) -> None:
    free = chat(json_server.port, response_format={"type": "text"}, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(content(free))  # no grammar: the random model writes no JSON
    assert STRUCTURED_HEADER.lower() not in free.headers and free.json()["edgepack"]["structured_output"] is None
    other = chat(json_server.port, response_format=as_schema(OTHER, name="check", strict=True))
    jsonschema.validate(json.loads(content(other)), OTHER)
    assert other.json()["edgepack"]["structured_output"]["requested_by"] == "response_format"


def test_any_bundle_takes_json_object_and_json_schema(tiny_gguf: Path, local: Any) -> None:
    server = local(tiny_gguf, n_ctx=512)  # a bare GGUF: no task
    plain = chat(server.port, max_tokens=24)
    assert STRUCTURED_HEADER.lower() not in plain.headers
    obj = chat(server.port, response_format={"type": "json_object"}, max_tokens=64)
    assert isinstance(json.loads(content(obj)), dict) and obj.headers[STRUCTURED_HEADER.lower()] == "constrained"
    for text in PROMPTS:
        reply = chat(server.port, messages=[{"role": "user", "content": text}], response_format=as_schema(SCHEMA),
                     max_tokens=64)
        jsonschema.validate(json.loads(content(reply)), SCHEMA)
    completion = call(server.port, "POST", "/v1/completions",
                      {"prompt": "Work order:", "max_tokens": 64, "response_format": as_schema(SCHEMA)})
    jsonschema.validate(json.loads(completion.json()["choices"][0]["text"]), SCHEMA)


BAD_SCHEMAS = [
    ({"type": "nothing"}, "not a valid JSON Schema"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 10 ** 9}, "too large"),
    ({"type": "string", "pattern": "^((a{99}){99}){99}$"}, "too large"),
    ({"$ref": "https://example.com/schema.json"}, "cannot resolve"),
]


@pytest.mark.parametrize("schema,message", BAD_SCHEMAS)
def test_bad_schemas_are_400_with_a_clear_message(schema: dict[str, Any], message: str, tiny_gguf: Path,
                                                  local: Any) -> None:
    server = local(tiny_gguf, n_ctx=512)
    for stream in (False, True):
        reply = chat(server.port, response_format=as_schema(schema), stream=stream)
        assert reply.status == 400, reply.body
        error = reply.json()["error"]
        assert error["param"] == "response_format" and message in error["message"], error
        assert error["message"].startswith("response_format: ")


def test_keywords_the_grammar_drops_are_named_and_refused_under_strict(tiny_gguf: Path, local: Any) -> None:
    bounded = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 99},
                                                "minimum": {"type": "string"}},  # a property, not a keyword
               "required": ["hours"]}
    server = local(tiny_gguf, n_ctx=512)
    strict = chat(server.port, response_format=as_schema(bounded, strict=True), max_tokens=32)
    assert strict.status == 400
    assert "cannot enforce maximum, minimum" in strict.json()["error"]["message"]
    loose = chat(server.port, response_format=as_schema(bounded), max_tokens=32)
    assert loose.status == 200 and loose.headers[STRUCTURED_HEADER.lower()] == "constrained; unenforced=maximum,minimum"
    meta = loose.json()["edgepack"]["structured_output"]
    assert meta["unenforced"] == ["maximum", "minimum"] and "does not enforce maximum, minimum" in meta["note"]
    assert isinstance(json.loads(content(loose))["hours"], int)  # the rest of the schema holds


def test_the_tasks_decoding_applies_and_request_fields_override(tiny_gguf: Path, tmp_path: Path, cache_dir: Path,
                                                                local: Any) -> None:
    task = Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset",)), system_prompt="Extract the work order.",
                decoding=Decoding(max_tokens=9, repeat_penalty=1.3, stop=('"h',)))
    bundle = gguf_bundle(tiny_gguf, tmp_path / "tiny-pen.edgepack", task)
    server = local(bundle)
    with open_model(bundle, threads=1) as session:
        def expect(**fields: Any) -> str:
            messages, decoding, schema = session.apply_task(USER, **fields)
            return "".join(session.answer(messages, decoding, schema))

        default, raw_penalty = expect(), expect(repeat_penalty=1.0, max_tokens=30)
    body = chat(server.port).json()
    assert body["choices"][0]["message"]["content"] == default and body["usage"]["completion_tokens"] <= 9
    overridden = chat(server.port, repeat_penalty=1.0, max_tokens=30)
    assert content(overridden) == raw_penalty and raw_penalty != default


# --- ONNX: accepted, unconstrained, said plainly ------------------------------------------------
def test_onnx_answers_unconstrained_and_says_so(tiny_onnx_fp32: dict[str, Any], tmp_path: Path,
                                                cache_dir: Path) -> None:
    bundle = onnx_bundle(tiny_onnx_fp32["path"], tmp_path / "tiny-onnx-json.edgepack", JSON_TASK)
    logged: list[str] = []
    server = make_server(bundle, ServeConfig(port=0, threads=1))
    try:
        server.start()
        server.load(warn=logged.append)
        assert any("cannot constrain decoding to a JSON schema" in line and STRUCTURED_HEADER in line
                   for line in logged), logged
        card = call(server.port, "GET", "/v1/models").json()["data"][0]
        assert card["edgepack"]["constrains_json"] is False
        by_task = chat(server.port, max_tokens=16)
        assert by_task.status == 200 and by_task.headers[STRUCTURED_HEADER.lower()] == "unconstrained"
        meta = by_task.json()["edgepack"]["structured_output"]
        assert meta["requested_by"] == "task" and meta["constrained"] is False and "onnx" in meta["note"]
        asked = chat(server.port, response_format=as_schema(OTHER), max_tokens=16, stream=True)
        assert asked.status == 200 and asked.headers[STRUCTURED_HEADER.lower()] == "unconstrained"
        assert asked.events()[-2]["edgepack"]["structured_output"]["requested_by"] == "response_format"
        bad = chat(server.port, response_format=as_schema({"type": "nothing"}))
        assert bad.status == 400 and "not a valid JSON Schema" in bad.json()["error"]["message"]
    finally:
        server.close()


# --- the openai SDK against a real `edgepack serve` ----------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_openai_sdk_response_format_against_edgepack_serve(tiny_gguf: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra)")
    port = _free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, EDGEPACK_CACHE=str(tmp_path / "cache"))
    cli = Path(sys.executable).with_name("edgepack")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(cli), "serve", str(tiny_gguf), "--port", str(port), "--ctx", "512",
                                 "--threads", "1"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while "serving http://" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for text in PROMPTS:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny-F16", messages=[{"role": "user", "content": text}], max_tokens=64,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "workorder", "schema": SCHEMA, "strict": True}})
            assert raw.headers[STRUCTURED_HEADER] == "constrained"
            jsonschema.validate(json.loads(raw.parse().choices[0].message.content), SCHEMA)
        done = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=64,
                                              response_format={"type": "json_object"},
                                              extra_body={"repeat_penalty": 1.1})
        assert isinstance(json.loads(done.choices[0].message.content), dict)
        with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
            client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nothing"}}})
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text(errors="replace")
