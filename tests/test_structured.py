"""Structured output: response_format json_schema / json_object / regex always gives text that parses and follows
it (enforced token by token); a schema that cannot be compiled, or a server that cannot enforce it, is a 400;
`lmforge generate --json-schema FILE` does the same on the command line."""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app as cli
from lmforge.generate import open_generator
from lmforge.serve import ServedModel, create_app
from test_serve import client, serving

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3}}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def follows_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"name", "size", "tags"} and isinstance(value["name"], str)
            and len(value["name"]) <= 12 and isinstance(value["size"], int)
            and all(t in ("red", "blue") for t in value["tags"]) and len(value["tags"]) <= 3)


def test_response_formats_always_parse(tiny_lm_dir):
    model, tok = open_generator(tiny_lm_dir)
    with serving(create_app({"tiny": ServedModel.of("tiny", model, tok)})) as base:
        c = client(base, key="unused")
        schema = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
        r = c.completions.create(model="tiny", prompt=["def value", "The river", "x"], max_tokens=120, n=2,
                                 temperature=0.9, seed=3, extra_body={"response_format": schema})
        assert len(r.choices) == 6
        for choice in r.choices:
            assert choice.finish_reason == "stop" and follows_schema(json.loads(choice.text)), choice.text
        streamed = "".join(e.choices[0].text for e in c.completions.create(
            model="tiny", prompt="def value", max_tokens=120, temperature=0.9, seed=3, stream=True,
            extra_body={"response_format": schema}) if e.choices)
        assert streamed == r.choices[0].text
        chat = c.completions.create(model="tiny", prompt="The river", max_tokens=60, temperature=0.8, seed=1,
                                    extra_body={"response_format": {"type": "json_object"}})
        assert isinstance(json.loads(chat.choices[0].text), dict)
        code = c.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0.8, seed=1,
                                    extra_body={"response_format": {"type": "regex", "regex": "[a-z]{3}-[0-9]{2}"}})
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", code.choices[0].text)
        for bad, words in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                            "cannot be compiled"), ({"type": "json_schema"}, "needs 'json_schema'"),
                           ({"type": "regex", "regex": "(unclosed"}, "regex")):
            with pytest.raises(openai.BadRequestError) as err:
                c.completions.create(model="tiny", prompt="x", extra_body={"response_format": bad})
            assert err.value.body["param"] == "response_format" and words in err.value.body["message"], err.value.body
    with serving(create_app({"tiny": ServedModel.of("tiny", model, tok)}, batching="micro")) as base:
        with pytest.raises(openai.BadRequestError) as err:
            client(base, key="unused").completions.create(model="tiny", prompt="x",
                                                          extra_body={"response_format": {"type": "json_object"}})
        assert "continuous batching" in err.value.body["message"]


def test_cli_generate_json_schema(tiny_lm_dir, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", str(tiny_lm_dir), "--prompt", "", "--json-schema", str(schema),
                                 "--temperature", "0.9", "--seed", "3", "--max-new-tokens", "120"])
    assert result.exit_code == 0 and follows_schema(json.loads(result.stdout)), result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((bad, "bad.json"), (tmp_path / "missing.json", "missing.json")):
        result = runner.invoke(cli, ["generate", str(tiny_lm_dir), "--prompt", "x", "--json-schema", str(path)])
        assert result.exit_code == 2 and result.stderr.startswith("error: --json-schema") and words in result.stderr
