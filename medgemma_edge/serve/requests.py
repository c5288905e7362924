"""An OpenAI chat request, turned into what the library takes: the conversation as template turns (user
text is data, never control tokens), its images decoded and checked, and one SamplingParams.

`to_sampling` is the one place where OpenAI's fields meet the sampler. A field the sampler has is passed
on; a field it lacks is refused when it would change the answer (never silently ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.uploads import Upload
from medgemma_edge.runtime.sampling import MAX_NEW_TOKENS, SamplingParams
from medgemma_edge.runtime.template import ImageItem, Item, Turn
from medgemma_edge.serve.schemas import MAX_STOP, ChatRequest, ImagePart, Message, TextPart

# OpenAI (or llama-server) request field -> SamplingParams field, passed on once the sampler has it
SAMPLER_FIELDS = {"presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                  "repetition_penalty": "repetition_penalty", "min_p": "min_p", "logit_bias": "logit_bias",
                  "response_format": "json_schema", "stop": "stop"}
NEUTRAL: dict[str, Any] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                           "min_p": 0.0, "logit_bias": {}, "stop": []}
TURN_SEPARATOR = "\x1e"  # between turns in the audit's prompt hash: one question alone hashes as `run` hashes it


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None
    images: list[Upload]
    prompt: str  # the conversation's text, for the audit hash (equal to `run`'s prompt for one question)


def _text(msg: Message, where: str, images: bool) -> list[TextPart | ImagePart] | str:
    if msg.content is None:
        raise UserError(f"{where}: the message has no content; send its text")
    if isinstance(msg.content, list) and not images and any(isinstance(p, ImagePart) for p in msg.content):
        raise UserError(f"{where}: only user messages may hold images; move the image to a user message")
    return msg.content


def conversation(req: ChatRequest, decode: Callable[[str, str], Upload], max_images: int) -> Conversation:
    """Turns in the Gemma order (system first, then user/assistant alternating, ending with a user turn).

    `decode(url, name)` checks and decodes one image URL; at most `max_images` are decoded.
    """
    system_texts: list[str] = []
    turns: list[Turn] = []
    uploads: list[Upload] = []
    texts: list[str] = []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if turns:
                raise UserError(f"{where}: a {msg.role} message after the conversation started; MedGemma takes "
                                f"the system text first only: move it to the start")
            content = _text(msg, where, images=False)
            system_texts.append(content if isinstance(content, str) else "".join(p.text for p in content))  # type: ignore[union-attr]
            continue
        role = "user" if msg.role == "user" else "model"
        expected = "user" if not turns or turns[-1].role == "model" else "model"
        if role != expected:
            raise UserError(f"{where}: roles must alternate user/assistant after the system text, starting with "
                            f"user (got {msg.role} where a {'user' if expected == 'user' else 'assistant'} "
                            f"message belongs); merge or reorder the messages")
        content = _text(msg, where, images=role == "user")
        if isinstance(content, str):
            turns.append(Turn(role, content))
            texts.append(content)
            continue
        items: list[Item] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                items.append(part.text)
                continue
            if len(uploads) >= max_images:
                raise UserError(f"{where}.content[{j}]: more than {max_images} images in one request "
                                f"(--max-images); ask about fewer images at a time")
            uploads.append(decode(part.image_url.url, f"{where}.content[{j}]"))
            items.append(ImageItem())
        text = "".join(p for p in items if isinstance(p, str))
        turns.append(Turn(role, text, sum(isinstance(p, ImageItem) for p in items), tuple(items)))
        texts.append(text)
    if not turns or turns[-1].role != "user":
        raise UserError("messages: the last message must be the user's question; end with a user message")
    system = "\n\n".join(system_texts) if system_texts else None
    return Conversation(turns, system, uploads, TURN_SEPARATOR.join(texts))


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise UserError(f"stop: {len(stops)} stop strings, more than {MAX_STOP}; send at most {MAX_STOP}")
    if any(not s for s in stops):
        raise UserError("stop: an empty stop string would end every answer at once; drop it")
    return stops


def wants_thinking(req: ChatRequest) -> bool:
    """`thinking: true`, or vLLM's and llama-server's `chat_template_kwargs: {"enable_thinking": true}`."""
    kwargs = req.chat_template_kwargs or {}
    return bool(req.thinking or kwargs.get("enable_thinking") or kwargs.get("thinking"))


def to_sampling(req: ChatRequest) -> SamplingParams:
    """OpenAI's fields as one SamplingParams. Omitted fields keep the library's defaults, so an omitted
    temperature is greedy, exactly as `run` answers."""
    have = {f.name for f in dataclasses.fields(SamplingParams)}
    kw: dict[str, Any] = {}
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_new is not None:
        if max_new > MAX_NEW_TOKENS:
            raise UserError(f"max_tokens {max_new} is more than MedGemma's output limit of {MAX_NEW_TOKENS}; "
                            f"ask for at most {MAX_NEW_TOKENS}")
        kw["max_new_tokens"] = max_new
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.logprobs:
        raise UserError("logprobs: not supported by this server; drop it")
    if req.tools:
        raise UserError("tools: tool calls are not supported by this server; drop tools")
    for field_name, sampler_name in SAMPLER_FIELDS.items():
        value = getattr(req, field_name)
        if field_name == "response_format":
            value = _schema(value)
        elif field_name == "stop":
            value = stop_strings(value)
        if value is None or value == NEUTRAL.get(field_name):
            continue
        if sampler_name not in have:
            raise UserError(f"{field_name}: not supported by this runtime's sampler; drop it")
        if field_name == "logit_bias":
            value = tuple((int(k), float(v)) for k, v in value.items())
        kw[sampler_name] = tuple(value) if field_name == "stop" else value
    return SamplingParams(**kw)


def _schema(fmt: Any) -> dict[str, Any] | None:
    """response_format as the JSON schema the sampler constrains to; None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise UserError("response_format: json_schema needs its schema; send {'type': 'json_schema', "
                        "'json_schema': {'name': ..., 'schema': {...}}}")
    return fmt.json_schema.schema_


def fit_to_context(sampling: SamplingParams, asked: bool, n_prompt: int, n_ctx: int) -> SamplingParams:
    """max_tokens against the context: refused when asked for more than is left (OpenAI's rule), else the
    default shortened to what is left."""
    from medgemma_edge.errors import PromptTooLong

    room = n_ctx - n_prompt
    if sampling.max_new_tokens <= room:
        return sampling
    if asked or room < 1:
        raise PromptTooLong(f"the prompt needs {n_prompt} tokens and max_tokens asks for {sampling.max_new_tokens} "
                            f"more, beyond the context of {n_ctx}; lower max_tokens to {max(room, 0)} or shorten "
                            f"the conversation (or restart the server with a larger --ctx)")
    return dataclasses.replace(sampling, max_new_tokens=room)
