"""Request bodies, as pydantic models: every field typed and range-checked; unknown fields are errors.

The completion and chat fields follow OpenAI's API; `top_k` and `repetition_penalty` are extensions.
OpenAI fields this server does not implement are accepted only at their neutral value.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_PROMPT_CHARS = 200_000
MAX_TEXTS = 256
MAX_TEXT_CHARS = 20_000


def _lone_surrogate(value) -> Optional[str]:
    """The first lone UTF-16 surrogate in a JSON value (valid JSON, but no text a tokenizer can encode)."""
    if isinstance(value, str):
        return next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := _lone_surrogate(item)) is not None), None)


class Strict(BaseModel):
    # NaN and infinity are valid JSON to Python but no setting: "Input should be a finite number".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value):
        found = _lone_surrogate(value)
        if found is not None:
            raise ValueError(f"contains a lone surrogate ({ascii(found)[1:-1]}), which is not Unicode text; "
                             "send UTF-8 text")
        return value


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str = Field(..., min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Strict):
    """OpenAI's `response_format` (text, json_object, json_schema), and the extension {"type": "regex",
    "regex": "..."}."""
    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: Optional[JsonSchemaFormat] = None
    regex: Optional[str] = Field(None, min_length=1, max_length=2000)

    @field_validator("regex")
    @classmethod
    def _regex(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("type") != "regex":
            raise ValueError("only with type 'regex'")
        return value

    def needs(self) -> Optional[str]:
        """The field the chosen type requires and lacks, if any."""
        if self.type == "json_schema" and self.json_schema is None:
            return "json_schema"
        if self.type == "regex" and self.regex is None:
            return "regex"
        return None


class Sampling(Strict):
    """Fields shared by completions and chat completions."""
    model: str = Field(..., min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1, le=1000)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(None, max_length=256)
    response_format: Optional[ResponseFormat] = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, value):
        if value is not None and value.needs():
            raise ValueError(f"type {value.type!r} needs '{value.needs()}'")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("each stop sequence must have 1 to 64 characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, value):
        if value:
            raise ValueError("only 0 is supported; use repetition_penalty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options needs stream: true")
        return value


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]] = Field(..., description="One prompt or a list of prompts")
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = Field(None, ge=1, le=16)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("give at least one prompt")
        if len(prompts) > 64:
            raise ValueError("at most 64 prompts per request")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"a prompt has more than {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value, info: ValidationInfo):
        if value is not None and (info.data.get("stream") or info.data.get("echo")):
            raise ValueError("logprobs is not available with stream or echo")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only best_of == n is supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]] = Field(...)
    name: Optional[str] = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _size(cls, value):
        if isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"a message has more than {MAX_PROMPT_CHARS} characters")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=0)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value):
        if value:
            raise ValueError("not supported for chat completions; use /v1/completions")
        return value


class ClassifyRequest(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    texts: list[str] = Field(..., min_length=1, max_length=MAX_TEXTS)
    text_pairs: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_TEXTS)

    @field_validator("texts")
    @classmethod
    def _lengths(cls, value):
        if any(len(t) > MAX_TEXT_CHARS for t in value):
            raise ValueError(f"a text has more than {MAX_TEXT_CHARS} characters")
        return value

    @field_validator("text_pairs")
    @classmethod
    def _pairs(cls, value, info: ValidationInfo):
        if value is not None and len(value) != len(info.data.get("texts") or ()):
            raise ValueError("text_pairs must have as many items as texts")
        if value is not None and any(len(t) > MAX_TEXT_CHARS for t in value):
            raise ValueError(f"a text has more than {MAX_TEXT_CHARS} characters")
        return value


class NerRequest(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    texts: list[str] = Field(..., min_length=1, max_length=MAX_TEXTS)

    @field_validator("texts")
    @classmethod
    def _lengths(cls, value):
        if any(len(t) > MAX_TEXT_CHARS for t in value):
            raise ValueError(f"a text has more than {MAX_TEXT_CHARS} characters")
        return value
