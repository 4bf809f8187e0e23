"""A chat's `messages` as a prompt: each message's content a string or a list of parts (text, and
image_url for a vision-language model), rendered through the model's chat template. The template
places one image placeholder per image part; each is then set to its image's token count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.frontend.images import ImageProcessor
from pipeserve.server.protocol import CHAT_ROLES, ApiError


@dataclass
class ChatParts:
    """The messages as the template takes them, and their images' sources in order."""

    messages: list[dict] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # where each image was: messages[i].content[j]
    chars: int = 0  # of text


def chat_parts(messages: Any, images: ImageProcessor) -> ChatParts:
    """`messages` checked, as the chat template takes them (`images`: the model's image side)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    parts = ChatParts()
    for i, msg in enumerate(messages):
        parts.messages.append(_message(i, msg, parts, images))
    return parts


def _message(i: int, msg: Any, parts: ChatParts, images: ImageProcessor) -> dict:
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise ApiError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    if msg["role"] not in CHAT_ROLES:
        raise ApiError(
            f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {msg['role'][:100]!r}",
            f"messages[{i}].role",
        )
    content = msg.get("content")
    if isinstance(content, list):
        content = _parts(i, content, parts, images)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise ApiError(
            f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content"
        )
    else:
        parts.chars += len(content)
    return {"role": msg["role"], "content": content}


def _parts(i: int, content: list, parts: ChatParts, images: ImageProcessor) -> str | list[dict]:
    """A vision-language model's template takes the list (text parts and {'type': 'image'}); a
    text model's takes the text parts joined by newlines."""
    vision = images.accepts_images
    out: list[dict] = []
    for j, part in enumerate(content):
        name = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
            parts.chars += len(part["text"])
        elif kind == "image_url" and vision:
            parts.sources.append(_image_url(part, name))
            parts.names.append(name)
            out.append({"type": "image"})
        elif kind == "image_url":
            raise ApiError(f"model {images.model_name} does not accept images", name)
        else:
            supported = "text and image_url" if vision else "text"
            raise ApiError(
                f"{name}: only {supported} parts ({{'type': 'text', 'text': ...}}"
                + (", {'type': 'image_url', 'image_url': {'url': ...}}" if vision else "")
                + ") are supported",
                f"messages[{i}].content",
            )
    return out if vision else "\n".join(p["text"] for p in out)


def _image_url(part: dict, name: str) -> str:
    """OpenAI's {'image_url': {'url': ...}}; a bare string is taken too."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ApiError(f"{name}.image_url must be an object with a non-empty 'url'", name)
    return url
