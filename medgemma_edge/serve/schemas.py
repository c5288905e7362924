"""The wire format: OpenAI's chat-completions request and response, as pydantic models, so the OpenAPI
document at /openapi.json says exactly what the server takes and returns (schemathesis tests it).

Unknown request fields are ignored, as OpenAI-compatible servers do; fields that would change the
answer and that this runtime does not implement are refused by `requests.to_sampling`, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_MESSAGES = 256
MAX_STOP = 4  # OpenAI's limit on stop strings


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImageURL(Lenient):
    url: str = Field(description="data:image/png;base64,..., data:image/jpeg;..., data:application/dicom;base64,...; "
                                 "file:///PATH only inside --allow-dir; http(s) is refused")
    detail: str | None = None


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None
    name: str | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class JsonSchema(Lenient):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatRequest(Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(default=None, description="token id -> bias")
    response_format: ResponseFormat | None = None
    thinking: bool | None = Field(default=None, description="ask the model to think first (MedGemma 27B and 1.5); "
                                  "the thought comes back as reasoning_content")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description='{"enable_thinking": true} as vLLM')
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    user: str | None = None


class RenderRequest(Lenient):
    image_url: ImageURL


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = Field(default=None, description="the model's thought, apart from the answer")
    schema_valid: bool | None = Field(default=None, description="with response_format json_schema: a complete, "
                                                                 "valid document")


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: Literal["stop", "length"]


class PromptDetails(BaseModel):
    cached_tokens: int = Field(description="prompt positions reused from the slot's KV cache")
    image_tokens: int = Field(description="prompt positions filled by image embeddings")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: dict[str, float] = Field(description="image_encode_ms, prefill_ms, time_to_first_token_ms, "
                                                  "decode_tokens_per_s, ...")
    notice: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medgemma-edge"
    artifacts: list[dict[str, Any]] = Field(description="the bundle's artifacts: kind, id, sha256, size, loaded")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
