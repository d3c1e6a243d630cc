"""What the endpoint accepts and answers, stated so that its OpenAPI schema tells the
whole truth: every constraint enforced here is in the schema, so a client generated from
``/openapi.json`` never sends a request that the schema allows and the endpoint refuses.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

MAX_TEXTS = 256
# Every model reads at most 1,024 tokens (the chapter's 120); 5,000 characters hold more.
MAX_TEXT_CHARS = 5_000
# The largest body the schema allows: each character written as a JSON escape pair
# (12 bytes), with room for quotes, separators and indentation. Anything larger is a 413.
MAX_BODY_BYTES = MAX_TEXTS * (MAX_TEXT_CHARS * 12 + 16) + 4_096

# "Not blank" as JSON Schema can say it: a character outside ECMA-262's \s (the regex
# dialect of JSON Schema), checked here with the same class, not with str.strip().
ECMA_WHITESPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = f"[^{ECMA_WHITESPACE}]"
NOT_BLANK_RE = re.compile(NOT_BLANK)


def not_blank(text: str) -> str:
    if not NOT_BLANK_RE.search(text):
        raise ValueError("text is empty")
    return text


Text = Annotated[
    StrictStr,
    Field(
        max_length=MAX_TEXT_CHARS,
        description="a message: at least one character that is not white space",
        json_schema_extra={"pattern": NOT_BLANK, "minLength": 1},
    ),
    AfterValidator(not_blank),
]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class ModelInfo(BaseModel):
    name: str
    version: str


class ClassifyResponse(BaseModel):
    label: str = Field(description="the most probable label")
    probability: float = Field(description="that label's probability")
    probabilities: dict[str, float] = Field(description="every label's probability")
    spam_probability: float | None = Field(
        default=None, description="P(spam), for models whose labels are spam and one other"
    )
    model: ModelInfo


class BatchResponse(BaseModel):
    predictions: list[ClassifyResponse]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong and how to fix it")
