"""Pydantic models of the client events nestvox accepts, in both dialects.

GA (the default) is OpenAI Realtime's current shape; beta is the older flat
one that `client.beta.realtime` still speaks. The models are strict
(`extra="forbid"`): a field we do not know, or know and cannot honour, is an
error with its path as `param`, never silently dropped. Fields that GA clients
send by habit (`tools: []`, `tracing: null`, ...) are accepted when their value
asks for nothing we lack.

We write our own models rather than validating with `openai.types.realtime`:
the SDK's models allow any extra field (an unknown setting would pass
unnoticed) and its PCM rate is `Literal[24000]`, while nestvox resamples from
every rate in `INPUT_RATES`. The tests check the server's events against the
SDK's own models instead.

Both dialects normalise a session update into one `SessionPatch`: a flat dict
of internal setting name -> `(value, param)`, `param` being the field's path in
the client's own event (for error messages).
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

INPUT_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
OUTPUT_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
G711_RATE = 8000
MAX_OUTPUT_TOKENS = 4096

SessionPatch = Dict[str, Tuple[Any, str]]


def _max_tokens(v):
    if v == "inf":
        return MAX_OUTPUT_TOKENS
    if not 1 <= v <= MAX_OUTPUT_TOKENS:
        raise ValueError(f"must be 1..{MAX_OUTPUT_TOKENS} or \"inf\", got {v!r}")
    return v


def _no_tools(v):
    if v:
        raise ValueError("tools are not supported (nestvox has no function calling); send []")
    return v


def _no_transcription(v):
    if v is not None:
        raise ValueError("input audio transcription is not supported: the model hears the audio itself and "
                         "makes no transcript; send null")
    return v


def _no_noise_reduction(v):
    if v is not None:
        raise ValueError("noise reduction is not supported; send null")
    return v


MaxTokens = Annotated[Union[Literal["inf"], int], AfterValidator(_max_tokens)]  # "inf" -> the cap
Tools = Annotated[Optional[List[Dict[str, Any]]], AfterValidator(_no_tools)]
Transcription = Annotated[Optional[Dict[str, Any]], AfterValidator(_no_transcription)]
NoiseReduction = Annotated[Optional[Dict[str, Any]], AfterValidator(_no_noise_reduction)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _rate(value: int, rates) -> int:
    if value not in rates:
        raise ValueError(f"rate must be one of {list(rates)}, got {value}")
    return value


class PCMFormat(Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: int = 24000

    @field_validator("rate")
    @classmethod
    def _known(cls, v):
        return _rate(v, INPUT_RATES)


class G711Format(Strict):
    """Telephone audio, 8 kHz: mu-law (pcmu) or A-law (pcma)."""

    type: Literal["audio/pcmu", "audio/pcma"]


def _default_pcm(data):
    # GA clients may send {"rate": 24000} alone: PCM is the default format type.
    if isinstance(data, dict) and isinstance(data.get("format"), dict) and "type" not in data["format"]:
        data = {**data, "format": {"type": "audio/pcm", **data["format"]}}
    return data


AudioFormat = Annotated[Union[PCMFormat, G711Format], Field(discriminator="type")]


class ServerVad(Strict):
    type: Literal["server_vad"] = "server_vad"
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0)
    prefix_padding_ms: Optional[int] = Field(None, ge=0, le=5000)
    silence_duration_ms: Optional[int] = Field(None, ge=0, le=10000)
    create_response: Optional[bool] = None
    interrupt_response: Optional[bool] = None
    idle_timeout_ms: Optional[int] = None  # only null: no idle-timeout responses
    # nestvox extensions (no GA name): silence kept at the turn's end, shortest speech that opens a turn
    suffix_padding_ms: Optional[int] = Field(None, ge=0, le=10000)
    min_speech_duration_ms: Optional[int] = Field(None, ge=0, le=5000)

    @field_validator("idle_timeout_ms")
    @classmethod
    def _no_idle(cls, v):
        if v is not None:
            raise ValueError("idle_timeout_ms is not supported (nestvox never answers silence); send null")
        return v


class SemanticVad(Strict):
    type: Literal["semantic_vad"]
    eagerness: Optional[Literal["low", "medium", "high", "auto"]] = None
    create_response: Optional[bool] = None
    interrupt_response: Optional[bool] = None
    # the VAD under it (nestvox extensions, as in server_vad; session.created shows them)
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0)
    prefix_padding_ms: Optional[int] = Field(None, ge=0, le=5000)
    suffix_padding_ms: Optional[int] = Field(None, ge=0, le=10000)
    min_speech_duration_ms: Optional[int] = Field(None, ge=0, le=5000)


class AudioInput(Strict):
    format: Optional[AudioFormat] = None
    turn_detection: Optional[Union[ServerVad, SemanticVad]] = Field(None, discriminator="type")
    transcription: Transcription = None
    noise_reduction: NoiseReduction = None

    @model_validator(mode="before")
    @classmethod
    def _vad_type(cls, data):
        data = _default_pcm(data)
        # A turn_detection object without "type" updates the server VAD (as the beta dialect allowed).
        if isinstance(data, dict) and isinstance(data.get("turn_detection"), dict) \
                and "type" not in data["turn_detection"]:
            data = {**data, "turn_detection": {"type": "server_vad", **data["turn_detection"]}}
        return data


class OutputPCMFormat(PCMFormat):
    """PCM out: the same fields, checked against the output rates."""

    @field_validator("rate")
    @classmethod
    def _known(cls, v):  # overrides PCMFormat's input-rate check
        return _rate(v, OUTPUT_RATES)


class VoiceId(Strict):
    id: str


class AudioOutput(Strict):
    format: Optional[Annotated[Union[OutputPCMFormat, G711Format], Field(discriminator="type")]] = None
    voice: Optional[Union[str, VoiceId]] = None
    speed: Optional[float] = Field(None, ge=0.25, le=1.5)

    _pcm = model_validator(mode="before")(classmethod(lambda cls, data: _default_pcm(data)))


class AudioConfig(Strict):
    input: Optional[AudioInput] = None
    output: Optional[AudioOutput] = None


class Extensions(Strict):
    """nestvox's own settings, under the session's `nestvox` key."""

    chunk_ms: Optional[int] = Field(None, ge=80, le=2560)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_turn_seconds: Optional[float] = Field(None, gt=0.0, le=600.0)




class GASession(Strict):
    type: Literal["realtime"] = "realtime"
    model: Optional[str] = None  # accepted, not switchable: the server serves one model
    instructions: Optional[str] = None
    output_modalities: Optional[List[Literal["text", "audio"]]] = None
    max_output_tokens: Optional[MaxTokens] = None
    audio: Optional[AudioConfig] = None
    nestvox: Optional[Extensions] = None
    # sent by habit; accepted when they ask for nothing we lack
    tools: Tools = None
    tool_choice: Optional[Union[Literal["auto", "none"], Dict[str, Any]]] = None
    tracing: Optional[Union[Literal["auto"], Dict[str, Any]]] = None
    truncation: Optional[Union[Literal["auto", "disabled"], Dict[str, Any]]] = None
    include: Optional[List[str]] = None
    parallel_tool_calls: Optional[bool] = None
    prompt: Optional[Dict[str, Any]] = None

    @field_validator("output_modalities")
    @classmethod
    def _one_modality(cls, v):
        if v is not None and len(set(v)) != 1:
            raise ValueError("output_modalities must be [\"text\"] or [\"audio\"] (audio replies carry their "
                             "transcript)")
        return v

    @field_validator("prompt")
    @classmethod
    def _no_prompt(cls, v):
        if v is not None:
            raise ValueError("stored prompts are not supported; use instructions")
        return v


class BetaSession(Strict):
    """The beta dialect's flat session object (plus nestvox's flat extensions)."""

    model: Optional[str] = None
    instructions: Optional[str] = None
    modalities: Optional[List[Literal["text", "audio"]]] = None
    turn_detection: Optional[Union[ServerVad, SemanticVad]] = Field(None, discriminator="type")
    input_audio_format: Optional[Literal["pcm16", "g711_ulaw", "g711_alaw"]] = None
    input_sample_rate: Optional[int] = None
    output_audio_format: Optional[Literal["pcm16", "g711_ulaw", "g711_alaw"]] = None
    voice: Optional[str] = None
    speed: Optional[float] = Field(None, ge=0.25, le=1.5)
    chunk_ms: Optional[int] = Field(None, ge=80, le=2560)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_turn_seconds: Optional[float] = Field(None, gt=0.0, le=600.0)
    max_response_output_tokens: Optional[MaxTokens] = None
    input_audio_transcription: Transcription = None
    input_audio_noise_reduction: NoiseReduction = None
    tools: Tools = None
    tool_choice: Optional[str] = None

    _vad = model_validator(mode="before")(AudioInput._vad_type.__func__)

    @field_validator("input_sample_rate")
    @classmethod
    def _known(cls, v):
        return None if v is None else _rate(v, INPUT_RATES)


# -- other client events -----------------------------------------------------------------
class InputText(Strict):
    type: Literal["input_text"]
    text: str


class UserMessage(Strict):
    id: Optional[str] = None
    object: Optional[Literal["realtime.item"]] = None
    type: Literal["message"] = "message"
    role: Literal["user"]
    status: Optional[str] = None
    content: List[InputText] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _only_user_text(cls, data):
        if isinstance(data, dict):
            role = data.get("role")
            if data.get("type", "message") != "message" or role not in (None, "user"):
                raise ValueError("only user messages can be created (type \"message\", role \"user\"): assistant "
                                 "and system items, function calls and function outputs are not supported")
            for part in data.get("content") or []:
                if isinstance(part, dict) and part.get("type") != "input_text":
                    raise ValueError(f"content parts must be input_text, got {part.get('type')!r}: send audio "
                                     f"through input_audio_buffer.append")
        return data


class ResponseOptions(Strict):
    instructions: Optional[str] = None
    max_output_tokens: Optional[MaxTokens] = None
    max_response_output_tokens: Optional[MaxTokens] = None  # the beta name
    output_modalities: Optional[List[Literal["text", "audio"]]] = None
    modalities: Optional[List[Literal["text", "audio"]]] = None  # the beta name
    conversation: Optional[Literal["auto"]] = None  # out-of-band responses ("none") are not supported
    metadata: Optional[Dict[str, Any]] = None
    voice: Optional[str] = None
    tools: Tools = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None


class ClientEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    event_id: Optional[str] = None


class SessionUpdate(ClientEvent):
    type: Literal["session.update"]
    session: Dict[str, Any]  # validated by the dialect's session model


class Append(ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class Commit(ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class Clear(ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ResponseCreate(ClientEvent):
    type: Literal["response.create"]
    response: Optional[ResponseOptions] = None


class ResponseCancel(ClientEvent):
    type: Literal["response.cancel"]
    response_id: Optional[str] = None


class ItemCreate(ClientEvent):
    type: Literal["conversation.item.create"]
    previous_item_id: Optional[str] = None
    item: UserMessage


class ItemDelete(ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ItemTruncate(ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = 0
    audio_end_ms: int = Field(ge=0)


class OutputAudioClear(ClientEvent):
    type: Literal["output_audio_buffer.clear"]


CLIENT_EVENTS = {m.model_fields["type"].annotation.__args__[0]: m for m in (
    SessionUpdate, Append, Commit, Clear, ResponseCreate, ResponseCancel, ItemCreate, ItemDelete, ItemTruncate,
    OutputAudioClear)}
