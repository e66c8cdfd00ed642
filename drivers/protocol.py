"""The bridge wire protocol: pydantic message headers, method table, and array framing.

A message is a ZeroMQ multipart message. Between the client's DEALER and the server's ROUTER it is

    request:  [b"", header_json, *array_frames]        (the ROUTER prepends the client identity)
    reply:    [b"", header_json, *array_frames]

`header_json` is UTF-8 JSON validated by `RequestHeader` / `ReplyHeader`. Arrays never go through
JSON: each array is one raw binary frame (C order, little-endian) described in the header by an
`ArrayDescriptor` (dtype from an allow-list, shape, frame index). Decoding checks that every declared
frame is present, that no undeclared frame is, and that the shape times the item size equals the
frame's byte length; it then wraps the frame's memory with `np.frombuffer` (no copy, read-only).

Values of the `drivers.base` types travel as tagged JSON: `{"$type": "StagePosition", "value": {...}}`;
a `Frame` is `{"$type": "Frame", "metadata": {...}, "image": <array index>}`; the cassette's slots are
`{"$type": "CassetteSlots", "value": [{...CassetteSlot...}, ...]}`. Nothing is pickled.

Every microscope method has a `MethodSpec`: its parameter model (strict: `"1"` is not a number and
`true` is not a float), its call kind (how the server schedules it), whether repeating it is harmless
(idempotent) and its default time limit.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.base import (
    CASSETTE_METHODS,
    ERROR_TYPES,
    IMAGE_SHIFT_METHODS,
    MICROSCOPE_METHODS,
    BridgeError,
    CassetteSlot,
    Frame,
    FrameMetadata,
    InvalidParameterError,
    MicroscopeError,
    MicroscopeInfo,
    OpticsPreset,
    ProtocolMismatchError,
    StageLimits,
    StagePosition,
)

#: Version of this wire protocol. Client and server must agree exactly.
#: 2: the image-shift capability (methods and MicroscopeInfo/FrameMetadata fields); 3: the autoloader cassette
#: capability (cassette_slots / loaded_slot / load_grid, CassetteSlots values, MicroscopeInfo.cassette_slots, which a
#: version-2 peer's strict models would refuse).
PROTOCOL_VERSION = 3

#: Name of the handshake method (not a microscope method).
HELLO_METHOD = "_hello"

#: Largest JSON request header the server accepts, in bytes.
MAX_HEADER_BYTES = 64 * 1024

#: Largest JSON reply header the client accepts, in bytes (frame metadata may carry driver extras).
MAX_REPLY_HEADER_BYTES = 16 * 1024 * 1024

#: Largest number of binary frames in one message.
MAX_ARRAYS = 8

#: Default largest total size of the arrays in one reply (bytes): a 8k x 8k uint16 frame is 128 MiB.
DEFAULT_MAX_ARRAY_BYTES = 512 * 1024 * 1024

#: Dtypes that may travel as arrays (always little-endian on the wire).
ALLOWED_DTYPES: tuple[str, ...] = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

DType = Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]


class MalformedMessageError(BridgeError):
    """A message could not be decoded: bad JSON, invalid header, wrong frames, size limits."""


# --------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True)


class ArrayDescriptor(BaseModel):
    """One binary frame that follows the header: element type, shape and position among the frames."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: DType
    shape: tuple[StrictInt, ...] = Field(min_length=1, max_length=4)
    frame_index: int = Field(ge=0, lt=MAX_ARRAYS, strict=True)

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 0 for n in shape):
            raise ValueError(f"array dimensions must be >= 0, got {shape}")
        return shape

    @property
    def nbytes(self) -> int:
        """Byte length the frame must have."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class RequestHeader(BaseModel):
    """A call from client to server.

    `idempotent` says whether the client may repeat the call with a *new* request id; a
    non-idempotent call (a move, an exposure) is only ever resent with the *same* id and
    `server_id` of the server it was first sent to, which the server uses to run it at most once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol_version: int = Field(strict=True)
    request_id: uuid.UUID
    method: str = Field(min_length=1, max_length=64, strict=True)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    idempotent: bool = Field(default=True, strict=True)
    server_id: str | None = Field(default=None, max_length=64)
    arrays: tuple[ArrayDescriptor, ...] = Field(default=(), max_length=MAX_ARRAYS)


class RemoteError(BaseModel):
    """An error raised on the server: `type` is a name from `drivers.base.ERROR_TYPES`."""

    model_config = _STRICT

    type: str = Field(max_length=64)
    message: str = Field(max_length=8192)
    detail_type: str = Field(default="", max_length=128, description="exact class name on the server")


class ReplyHeader(BaseModel):
    """The answer to one request: either `ok` with a `result`, or an `error`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol_version: int = Field(strict=True)
    request_id: uuid.UUID | None = None
    server_id: str = Field(default="", max_length=64)
    ok: bool = Field(strict=True)
    result: JsonValue = None
    error: RemoteError | None = None
    arrays: tuple[ArrayDescriptor, ...] = Field(default=(), max_length=MAX_ARRAYS)

    @model_validator(mode="after")
    def _ok_xor_error(self) -> ReplyHeader:
        if self.ok == (self.error is not None):
            raise ValueError("a reply has either ok=true and no error, or ok=false and an error")
        return self


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------

_PARAMS = ConfigDict(frozen=True, extra="forbid", strict=True)


class NoParams(BaseModel):
    """A method without parameters."""

    model_config = _PARAMS


class MoveStageParams(BaseModel):
    """`move_stage`: absolute target (um, deg); `None` keeps an axis."""

    model_config = _PARAMS

    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    alpha_deg: float | None = None
    wait: bool = True

    @field_validator("x_um", "y_um", "z_um", "alpha_deg")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("stage coordinates must be finite")
        return value


class WaitForStageParams(BaseModel):
    """`wait_for_stage`: how long to wait, seconds."""

    model_config = _PARAMS

    timeout_s: float = Field(default=60.0, gt=0, le=24 * 3600)


class SetPresetParams(BaseModel):
    """`set_preset`: preset name."""

    model_config = _PARAMS

    name: str = Field(min_length=1, max_length=256)


class SetBeamBlankedParams(BaseModel):
    """`set_beam_blanked`: True blanks the beam."""

    model_config = _PARAMS

    blanked: bool


class AcquireParams(BaseModel):
    """`acquire` / `acquire_diffraction`: exposure time in seconds (range checked by the microscope)."""

    model_config = _PARAMS

    exposure_s: float

    @field_validator("exposure_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("exposure_s must be finite")
        return value


class SetImageShiftParams(BaseModel):
    """`set_image_shift`: the shift in specimen micrometres along the stage axes (range checked by the microscope)."""

    model_config = _PARAMS

    x_um: float
    y_um: float

    @field_validator("x_um", "y_um")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("an image shift must be finite")
        return value


class LoadGridParams(BaseModel):
    """`load_grid`: the cassette slot, a whole number from 1 (its upper end is checked by the microscope)."""

    model_config = _PARAMS

    slot: int = Field(ge=1, le=1000)


class HelloParams(BaseModel):
    """The handshake: the client's protocol version and a name for the server's log."""

    model_config = _PARAMS

    client_protocol_version: int
    client_name: str = Field(default="", max_length=128)


CallKind = Literal["read", "control", "stop"]


@dataclass(frozen=True)
class MethodSpec:
    """How one method travels and is scheduled.

    - `kind`: "read" calls (status queries) may run concurrently with each other and with one
      control call; "control" calls (stage, optics, camera) run one at a time in arrival order;
      "stop" (stop_stage) runs at once, never queued behind a move.
    - `idempotent`: repeating the call is harmless, so a client may retry it after a timeout.
    - `timeout_s(params, base_s)`: default client time limit in seconds, from the base limit of quick calls.
    - `events`: event topics whose state the call may change (the server publishes them afterwards).
    """

    name: str
    params: type[BaseModel]
    kind: CallKind
    idempotent: bool
    timeout_s: Callable[[BaseModel, float], float]
    events: tuple[str, ...] = ()


def _quick(_params: BaseModel, base_s: float) -> float:
    return base_s


def _move_timeout(_params: BaseModel, base_s: float) -> float:
    return max(base_s, 300.0)


def _wait_timeout(params: BaseModel, base_s: float) -> float:
    assert isinstance(params, WaitForStageParams)
    return params.timeout_s + max(base_s, 10.0)


def _acquire_timeout(params: BaseModel, base_s: float) -> float:
    assert isinstance(params, AcquireParams)
    return 2.0 * max(params.exposure_s, 0.0) + max(base_s, 30.0)


def _preset_timeout(_params: BaseModel, base_s: float) -> float:
    return max(base_s, 60.0)


def _load_grid_timeout(_params: BaseModel, base_s: float) -> float:
    # an exchange (the grid on the stage back to its slot, the new one in) takes minutes; allow ten
    return max(base_s, 600.0)


#: Every method the server serves, by name: the `Microscope` methods plus the handshake.
METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(HELLO_METHOD, HelloParams, "read", True, _quick),
        MethodSpec("info", NoParams, "read", True, _quick),
        MethodSpec("microscope_time_s", NoParams, "read", True, _quick),
        MethodSpec("get_stage", NoParams, "read", True, _quick),
        MethodSpec("stage_limits", NoParams, "read", True, _quick),
        MethodSpec("move_stage", MoveStageParams, "control", False, _move_timeout, ("stage",)),
        MethodSpec("is_stage_moving", NoParams, "read", True, _quick),
        MethodSpec("wait_for_stage", WaitForStageParams, "control", True, _wait_timeout, ("stage",)),
        MethodSpec("stop_stage", NoParams, "stop", True, _quick, ("stage",)),
        MethodSpec("get_preset", NoParams, "read", True, _quick),
        MethodSpec("set_preset", SetPresetParams, "control", True, _preset_timeout, ("optics",)),
        MethodSpec("set_beam_blanked", SetBeamBlankedParams, "control", True, _quick, ("beam",)),
        MethodSpec("is_beam_blanked", NoParams, "read", True, _quick),
        MethodSpec("acquire", AcquireParams, "control", False, _acquire_timeout, ("stage",)),
        MethodSpec("acquire_diffraction", AcquireParams, "control", False, _acquire_timeout, ("stage",)),
        # the optional image-shift capability (drivers.base.ImageShiftMicroscope)
        MethodSpec("get_image_shift", NoParams, "read", True, _quick),
        MethodSpec("set_image_shift", SetImageShiftParams, "control", True, _quick, ("optics",)),
        # the optional cassette capability (drivers.base.CassetteMicroscope): reads stay answerable during a load
        MethodSpec("cassette_slots", NoParams, "read", True, _quick),
        MethodSpec("loaded_slot", NoParams, "read", True, _quick),
        MethodSpec("load_grid", LoadGridParams, "control", False, _load_grid_timeout, ("stage",)),
    )
}

assert set(MICROSCOPE_METHODS) | set(IMAGE_SHIFT_METHODS) | set(CASSETTE_METHODS) <= set(METHOD_SPECS), (
    "every method needs a MethodSpec"
)


def validate_params(method: str, params: dict[str, Any]) -> BaseModel:
    """The validated parameter model of `method`; `BridgeError` if unknown, `InvalidParameterError` if bad."""
    spec = METHOD_SPECS.get(method)
    if spec is None:
        raise BridgeError(f"unknown method {method[:64]!r}; the server serves: {', '.join(METHOD_SPECS)}")
    try:
        return spec.params.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidParameterError(f"bad parameters for {method}: {problems}") from None


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

#: The pydantic value types that may travel, by tag.
VALUE_TYPES: dict[str, type[BaseModel]] = {
    cls.__name__: cls
    for cls in (StagePosition, StageLimits, OpticsPreset, MicroscopeInfo, FrameMetadata, CassetteSlot)
}


def encode_value(value: Any) -> tuple[JsonValue, list[np.ndarray]]:
    """Encode a method result as JSON plus the arrays that travel as binary frames.

    Accepts None, bool, int, float (finite), str, a pair of finite numbers (e.g. an image shift in um, as
    `{"$type": "Pair", "value": [x, y]}`), a tuple of `CassetteSlot`s (`CassetteSlots`), the `drivers.base`
    models and `Frame`.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value, []
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedMessageError(f"cannot send the non-finite number {value}")
        return value, []
    if isinstance(value, tuple) and len(value) == 2 and all(_finite_number(v) for v in value):
        return {"$type": "Pair", "value": [float(value[0]), float(value[1])]}, []
    if isinstance(value, tuple) and all(isinstance(v, CassetteSlot) for v in value):
        return {"$type": "CassetteSlots", "value": [v.model_dump(mode="json") for v in value]}, []
    if isinstance(value, Frame):
        return {"$type": "Frame", "metadata": value.metadata.model_dump(mode="json"), "image": 0}, [value.image]
    name = type(value).__name__
    if isinstance(value, BaseModel) and VALUE_TYPES.get(name) is type(value):
        return {"$type": name, "value": value.model_dump(mode="json")}, []
    raise MalformedMessageError(f"cannot send a value of type {name} over the bridge")


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(
        float(value)  # type: ignore[arg-type]
    )


def decode_value(obj: JsonValue, arrays: Sequence[np.ndarray]) -> Any:
    """Inverse of `encode_value`; raises `MalformedMessageError` if the JSON is not a valid value."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if not isinstance(obj, dict) or "$type" not in obj:
        raise MalformedMessageError(f"a result must be a scalar or a tagged object, got {type(obj).__name__}")
    tag = obj["$type"]
    try:
        if tag == "Frame":
            index = obj.get("image")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(arrays):
                raise MalformedMessageError(f"Frame refers to array {index!r}, but the message has {len(arrays)}")
            metadata = FrameMetadata.model_validate(obj.get("metadata"))
            return Frame(image=arrays[index], metadata=metadata)
        if tag == "Pair":
            pair = obj.get("value")
            if not isinstance(pair, list) or len(pair) != 2 or not all(_finite_number(v) for v in pair):
                raise MalformedMessageError(f"a Pair must hold two finite numbers, got {pair!r}")
            return (float(pair[0]), float(pair[1]))  # type: ignore[arg-type]
        if tag == "CassetteSlots":
            slots = obj.get("value")
            if not isinstance(slots, list):
                raise MalformedMessageError(f"CassetteSlots must hold a list of slots, got {type(slots).__name__}")
            return tuple(CassetteSlot.model_validate(slot) for slot in slots)
        cls = VALUE_TYPES.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise MalformedMessageError(f"unknown value type {tag!r}")
        return cls.model_validate(obj.get("value"))
    except (ValidationError, InvalidParameterError) as exc:
        raise MalformedMessageError(f"invalid {tag} in a reply: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def error_to_wire(exc: BaseException) -> RemoteError:
    """Describe an exception for the wire: the nearest class in `ERROR_TYPES` and the message.

    Exceptions that are not `MicroscopeError`s (a bug in an adapter) travel as `MicroscopeError`
    with the original class name in the message.
    """
    wire_type = "MicroscopeError"
    for cls in type(exc).__mro__:
        if cls.__name__ in ERROR_TYPES and ERROR_TYPES[cls.__name__] is cls:
            wire_type = cls.__name__
            break
    message = str(exc) if isinstance(exc, MicroscopeError) else f"{type(exc).__name__}: {exc}"
    return RemoteError(type=wire_type, message=message[:8192], detail_type=type(exc).__name__[:128])


def error_from_wire(error: RemoteError) -> MicroscopeError:
    """The exception to raise on the client for a remote error (unknown names become `MicroscopeError`)."""
    cls = ERROR_TYPES.get(error.type, MicroscopeError)
    return cls(error.message)


# --------------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------------


def as_buffer(part: Any) -> memoryview:
    """A memoryview of one message part (`bytes`, `zmq.Frame`, `memoryview`, numpy array) without copying."""
    buffer = getattr(part, "buffer", None)
    view = buffer if isinstance(buffer, memoryview) else memoryview(part)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in bridge JSON")


def _parse_json(part: Any, what: str, limit: int = MAX_HEADER_BYTES) -> Any:
    view = as_buffer(part)
    if view.nbytes > limit:
        raise MalformedMessageError(f"{what} header is {view.nbytes} bytes; the limit is {limit}")
    try:
        return json.loads(view.tobytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{what} header is not valid UTF-8 JSON: {str(exc)[:200]}") from None


def encode_arrays(arrays: Sequence[np.ndarray]) -> tuple[tuple[ArrayDescriptor, ...], list[np.ndarray]]:
    """Descriptors and C-contiguous little-endian arrays ready to send as frames (no copy if already so)."""
    if len(arrays) > MAX_ARRAYS:
        raise MalformedMessageError(f"at most {MAX_ARRAYS} arrays per message, got {len(arrays)}")
    descriptors, frames = [], []
    for index, array in enumerate(arrays):
        name = array.dtype.name
        if name not in ALLOWED_DTYPES:
            raise MalformedMessageError(f"dtype {name} cannot travel; allowed: {', '.join(ALLOWED_DTYPES)}")
        wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        descriptors.append(ArrayDescriptor(dtype=name, shape=tuple(int(n) for n in wire.shape), frame_index=index))
        frames.append(wire)
    return tuple(descriptors), frames


def decode_arrays(
    descriptors: Sequence[ArrayDescriptor], parts: Sequence[Any], max_bytes: int = DEFAULT_MAX_ARRAY_BYTES
) -> list[np.ndarray]:
    """Wrap binary frames as read-only arrays after checking them against their descriptors.

    Raises `MalformedMessageError` when the number of frames differs from the descriptors, a frame
    index is out of order, the byte length does not match the shape, or the total exceeds `max_bytes`.
    """
    if len(parts) != len(descriptors):
        raise MalformedMessageError(f"the header declares {len(descriptors)} array frame(s) but {len(parts)} came")
    total = 0
    arrays = []
    for position, (descriptor, part) in enumerate(zip(descriptors, parts, strict=True)):
        if descriptor.frame_index != position:
            raise MalformedMessageError(f"array {position} has frame_index {descriptor.frame_index}")
        view = as_buffer(part)
        total += view.nbytes
        if total > max_bytes:
            raise MalformedMessageError(f"arrays exceed the limit of {max_bytes} bytes")
        if view.nbytes != descriptor.nbytes:
            raise MalformedMessageError(
                f"array {position}: shape {descriptor.shape} of {descriptor.dtype} needs {descriptor.nbytes} "
                f"bytes, the frame has {view.nbytes}"
            )
        array = np.frombuffer(view, dtype=np.dtype(descriptor.dtype).newbyteorder("<")).reshape(descriptor.shape)
        arrays.append(array)
    return arrays


def new_request(
    method: str, params: dict[str, Any] | None = None, *, idempotent: bool = True, server_id: str | None = None
) -> RequestHeader:
    """A request header with a fresh request id."""
    return RequestHeader(
        protocol_version=PROTOCOL_VERSION,
        request_id=uuid.uuid4(),
        method=method,
        params=params or {},
        idempotent=idempotent,
        server_id=server_id,
    )


def encode_header(header: BaseModel) -> bytes:
    """A header as compact UTF-8 JSON."""
    return header.model_dump_json(exclude_defaults=False).encode("utf-8")


def decode_request(parts: Sequence[Any]) -> RequestHeader:
    """Validate `[header, *frames]` (after the envelope) as a request; `MalformedMessageError` if invalid.

    A request whose `protocol_version` differs raises `ProtocolMismatchError` before anything else is
    checked, so an old or new client gets a clear answer.
    """
    if not parts:
        raise MalformedMessageError("empty message: expected a JSON header frame")
    raw = _parse_json(parts[0], "request")
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"request header must be a JSON object, got {type(raw).__name__}")
    version = raw.get("protocol_version")
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatchError(
            f"the client speaks bridge protocol {version!r}, this server speaks {PROTOCOL_VERSION}; "
            "install the same crystal-locator version on both sides"
        )
    try:
        header = RequestHeader.model_validate(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"invalid request header: {_summary(exc)}") from None
    if len(parts) - 1 != len(header.arrays):
        raise MalformedMessageError(
            f"the header declares {len(header.arrays)} array frame(s) but {len(parts) - 1} came"
        )
    return header


def peek_request_id(part: Any) -> uuid.UUID | None:
    """The request id in a header that failed validation, if one can be read (for the error reply)."""
    try:
        raw = json.loads(as_buffer(part).tobytes().decode("utf-8"), parse_constant=_reject_constant)
        return uuid.UUID(str(raw["request_id"])) if isinstance(raw, dict) else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None


def decode_reply(
    parts: Sequence[Any], max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
) -> tuple[ReplyHeader, list[np.ndarray]]:
    """Validate `[header, *frames]` as a reply and wrap its arrays; `MalformedMessageError` if invalid."""
    if not parts:
        raise MalformedMessageError("empty reply")
    raw = _parse_json(parts[0], "reply", MAX_REPLY_HEADER_BYTES)
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"reply header must be a JSON object, got {type(raw).__name__}")
    if raw.get("protocol_version") != PROTOCOL_VERSION:
        raise ProtocolMismatchError(
            f"the server speaks bridge protocol {raw.get('protocol_version')!r}, this client speaks "
            f"{PROTOCOL_VERSION}; install the same crystal-locator version on both sides"
        )
    try:
        header = ReplyHeader.model_validate(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"invalid reply header: {_summary(exc)}") from None
    return header, decode_arrays(header.arrays, parts[1:], max_array_bytes)


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '-'}: {err['msg']}" for err in exc.errors()[:5])
