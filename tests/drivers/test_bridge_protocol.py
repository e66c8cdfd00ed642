"""Wire protocol of the bridge: value encoding, array framing, strict validation (no sockets)."""

from __future__ import annotations

import contextlib
import json
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import (
    ERROR_TYPES,
    MICROSCOPE_METHODS,
    BridgeError,
    Frame,
    FrameMetadata,
    InvalidParameterError,
    MicroscopeError,
    MicroscopeInfo,
    OpticsPreset,
    ProtocolMismatchError,
    StageLimitError,
    StageLimits,
    StagePosition,
)
from drivers.protocol import (
    MAX_HEADER_BYTES,
    METHOD_SPECS,
    PROTOCOL_VERSION,
    ArrayDescriptor,
    MalformedMessageError,
    ReplyHeader,
    decode_arrays,
    decode_reply,
    decode_request,
    decode_value,
    encode_arrays,
    encode_header,
    encode_value,
    error_from_wire,
    error_to_wire,
    new_request,
    peek_request_id,
    validate_params,
)


def _metadata() -> FrameMetadata:
    return FrameMetadata(
        preset="search",
        magnification=2500.0,
        pixel_size_um=0.05,
        binning=2,
        stage=StagePosition(x_um=12.5, y_um=-3.0, alpha_deg=1.5),
        exposure_s=0.5,
        time_s=42.0,
        extra={"dose_e_per_a2": 0.1, "note": "x"},
    )


def _roundtrip(value: object) -> object:
    """Encode a value, serialise header and frames to bytes as a socket would, decode again."""
    result, arrays = encode_value(value)
    descriptors, frames = encode_arrays(arrays)
    header = ReplyHeader(protocol_version=PROTOCOL_VERSION, request_id=uuid.uuid4(), ok=True, result=result,
                         arrays=descriptors)
    parts = [encode_header(header), *(bytes(memoryview(f)) for f in frames)]
    decoded_header, decoded_arrays = decode_reply(parts)
    return decode_value(decoded_header.result, decoded_arrays)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        7,
        3.25,
        "atlas",
        StagePosition(x_um=1.0, y_um=-2.0, z_um=3.5, alpha_deg=-30.0),
        StageLimits(x_min_um=-500.0),
        OpticsPreset(name="exposure", magnification=20000, pixel_size_um=0.002, camera_length_mm=800.0),
        MicroscopeInfo(
            name="sim",
            camera_shape_px=(512, 1024),
            presets=(OpticsPreset(name="atlas", magnification=150, pixel_size_um=0.5),),
            stage_limits=StageLimits(),
            software_version="1.0",
            simulated=True,
        ),
        _metadata(),
    ],
)
def test_values_round_trip_unchanged(value: object) -> None:
    assert _roundtrip(value) == value


def test_frame_round_trips_with_pixels_and_metadata() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 65535, size=(37, 53), dtype=np.uint16)
    frame = _roundtrip(Frame(image=image, metadata=_metadata()))
    assert isinstance(frame, Frame)
    np.testing.assert_array_equal(frame.image, image)
    assert frame.metadata == _metadata()
    assert not frame.image.flags.writeable


def test_decoded_array_shares_the_frame_memory() -> None:
    """No copy on decode: the array is a view of the received frame's bytes."""
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    descriptors, frames = encode_arrays([image])
    received = bytearray(memoryview(frames[0]).cast("B"))
    (array,) = decode_arrays(descriptors, [received])
    assert array[0, 1] == 1
    received[2] = 99  # little-endian low byte of element 1
    assert array[0, 1] == 99


def test_big_endian_arrays_travel_as_little_endian_values() -> None:
    image = np.arange(6, dtype=">u2").reshape(2, 3)
    descriptors, frames = encode_arrays([image])
    (array,) = decode_arrays(descriptors, [bytes(memoryview(frames[0]).cast("B"))])
    np.testing.assert_array_equal(array, [[0, 1, 2], [3, 4, 5]])
    assert descriptors[0].dtype == "uint16"


def test_array_frames_are_checked_against_their_descriptors() -> None:
    descriptor = ArrayDescriptor(dtype="uint16", shape=(4, 4), frame_index=0)
    with pytest.raises(MalformedMessageError, match="needs 32 bytes"):
        decode_arrays([descriptor], [b"\0" * 31])
    with pytest.raises(MalformedMessageError, match="declares 1"):
        decode_arrays([descriptor], [])
    with pytest.raises(MalformedMessageError, match="declares 1"):
        decode_arrays([descriptor], [b"\0" * 32, b"\0" * 32])
    with pytest.raises(MalformedMessageError, match="limit"):
        decode_arrays([descriptor], [b"\0" * 32], max_bytes=16)
    shifted = ArrayDescriptor(dtype="uint16", shape=(4, 4), frame_index=1)
    with pytest.raises(MalformedMessageError, match="frame_index"):
        decode_arrays([shifted], [b"\0" * 32])


def test_disallowed_dtypes_cannot_be_sent_or_declared() -> None:
    with pytest.raises(MalformedMessageError, match="cannot travel"):
        encode_arrays([np.array(["a"], dtype=object)])
    with pytest.raises(MalformedMessageError, match="cannot travel"):
        encode_arrays([np.zeros(3, dtype=np.complex64)])
    header = {"protocol_version": PROTOCOL_VERSION, "ok": True, "result": None,
              "arrays": [{"dtype": "object", "shape": [1], "frame_index": 0}]}
    with pytest.raises(MalformedMessageError, match="invalid reply header"):
        decode_reply([json.dumps(header).encode(), b"\0" * 8])


def test_a_frame_that_is_not_uint16_is_rejected_on_decode() -> None:
    result = {"$type": "Frame", "metadata": _metadata().model_dump(mode="json"), "image": 0}
    with pytest.raises(MalformedMessageError, match="Frame"):
        decode_value(result, [np.zeros((2, 2), dtype=np.float32)])
    with pytest.raises(MalformedMessageError, match="array 3"):
        decode_value({**result, "image": 3}, [])
    with pytest.raises(MalformedMessageError, match="unknown value type"):
        decode_value({"$type": "os.system", "value": "rm"}, [])
    with pytest.raises(MalformedMessageError):
        decode_value({"$type": "StagePosition", "value": {"x_um": "NaN-ish"}}, [])


def test_request_header_round_trip_and_version_check() -> None:
    header = new_request("move_stage", {"x_um": 1.0, "wait": False}, idempotent=False)
    decoded = decode_request([encode_header(header)])
    assert decoded == header
    other_version = json.loads(encode_header(header))
    other_version["protocol_version"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolMismatchError, match="protocol"):
        decode_request([json.dumps(other_version).encode()])


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"protocol_version": 3, "request_id": "nope", "method": "info"}', "request_id"),
        (b'{"protocol_version": 3, "request_id": "%s", "method": "info", "params": {"x": NaN}}' % str(
            uuid.uuid4()).encode(), "JSON"),
        (b'{"protocol_version": 3, "request_id": "%s", "method": "info", "evil": 1}' % str(
            uuid.uuid4()).encode(), "evil"),
        (b" " * (MAX_HEADER_BYTES + 1), "limit"),
    ],
)
def test_malformed_request_headers_raise_malformed_message_error(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode_request([raw])


def test_replies_may_carry_large_metadata_but_requests_may_not() -> None:
    metadata = _metadata().model_copy(update={"extra": {"notes": "n" * (2 * MAX_HEADER_BYTES)}})
    frame = Frame(image=np.zeros((2, 2), dtype=np.uint16), metadata=metadata)
    restored = _roundtrip(frame)
    assert isinstance(restored, Frame) and restored.metadata.extra["notes"] == metadata.extra["notes"]
    with pytest.raises(MalformedMessageError, match="limit"):
        decode_request([encode_header(new_request("set_preset", {"name": "n" * (2 * MAX_HEADER_BYTES)}))])


def test_request_with_undeclared_frames_is_rejected() -> None:
    header = encode_header(new_request("get_stage"))
    with pytest.raises(MalformedMessageError, match="declares 0"):
        decode_request([header, b"extra"])


def test_request_id_can_be_read_from_a_header_that_fails_validation() -> None:
    request_id = uuid.uuid4()
    raw = json.dumps({"protocol_version": 3, "request_id": str(request_id), "method": 5}).encode()
    assert peek_request_id(raw) == request_id
    assert peek_request_id(b"\x00garbage") is None


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("acquire", {"exposure_s": "1"}),
        ("acquire", {"exposure_s": True}),
        ("acquire", {}),
        ("move_stage", {"x_um": [1, 2]}),
        ("move_stage", {"x_um": float("inf")}),
        ("move_stage", {"wait": "yes"}),
        ("set_preset", {"name": 3}),
        ("set_beam_blanked", {"blanked": 1}),
        ("get_stage", {"unexpected": 1}),
        ("wait_for_stage", {"timeout_s": -1.0}),
    ],
)
def test_parameters_are_validated_strictly(method: str, params: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError, match=method):
        validate_params(method, params)


def test_unknown_methods_are_bridge_errors() -> None:
    with pytest.raises(BridgeError, match="unknown method"):
        validate_params("__class__", {})


def test_every_microscope_method_has_a_spec_with_sensible_timeouts() -> None:
    assert set(MICROSCOPE_METHODS) <= set(METHOD_SPECS)
    status = METHOD_SPECS["get_stage"].timeout_s(validate_params("get_stage", {}), 5.0)
    move = METHOD_SPECS["move_stage"].timeout_s(validate_params("move_stage", {"x_um": 1.0}), 5.0)
    short = METHOD_SPECS["acquire"].timeout_s(validate_params("acquire", {"exposure_s": 1.0}), 5.0)
    long = METHOD_SPECS["acquire"].timeout_s(validate_params("acquire", {"exposure_s": 100.0}), 5.0)
    assert status == 5.0 and move > 60.0 and long > short + 100.0
    assert not METHOD_SPECS["move_stage"].idempotent and not METHOD_SPECS["acquire"].idempotent
    assert METHOD_SPECS["get_stage"].kind == "read" and METHOD_SPECS["stop_stage"].kind == "stop"


def test_errors_cross_as_their_nearest_known_type() -> None:
    for name, cls in ERROR_TYPES.items():
        restored = error_from_wire(error_to_wire(cls(f"{name} happened")))
        assert type(restored) is cls and str(restored) == f"{name} happened"

    class VendorLimitError(StageLimitError):
        pass

    assert type(error_from_wire(error_to_wire(VendorLimitError("far")))) is StageLimitError
    wire = error_to_wire(ZeroDivisionError("oops"))
    assert wire.type == "MicroscopeError" and "ZeroDivisionError" in wire.message
    assert type(error_from_wire(wire.model_copy(update={"type": "NoSuchError"}))) is MicroscopeError


def test_non_finite_results_are_refused_at_the_sender() -> None:
    with pytest.raises(MalformedMessageError):
        encode_value(float("nan"))
    with pytest.raises(MalformedMessageError):
        encode_value(object())


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_bytes_only_ever_raise_bridge_errors(parts: list[bytes]) -> None:
    with contextlib.suppress(BridgeError):
        decode_request(parts)
    with contextlib.suppress(BridgeError):
        decode_reply(parts)
