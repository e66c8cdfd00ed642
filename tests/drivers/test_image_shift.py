"""The optional image-shift capability: the simulator, the bridge (real sockets) and the temscript adapter."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.base import (
    ImageShiftMicroscope,
    InvalidParameterError,
    MicroscopeError,
    image_shift_limit_um,
)
from drivers.zmq_bridge import BridgeClient, BridgeServer
from tests.conftest import MakeMicroscope


def test_simulator_shifts_the_view_not_the_stage(simulated_microscope: MakeMicroscope) -> None:
    scope = simulated_microscope(camera_px=256)
    assert isinstance(scope, ImageShiftMicroscope) and image_shift_limit_um(scope) == 15.0
    scope.set_preset("search")
    scope.move_stage(x_um=20.0, y_um=10.0)
    plain = scope.acquire(0.5)
    scope.set_image_shift(4.0, -3.0)
    shifted = scope.acquire(0.5)
    assert scope.get_image_shift() == (4.0, -3.0)
    assert (shifted.metadata.stage.x_um, shifted.metadata.stage.y_um) == (20.0, 10.0)
    assert shifted.metadata.view_xy_um == (24.0, 7.0) and plain.metadata.view_xy_um == (20.0, 10.0)
    # the same area seen through the shift and from a stage move there: the same specimen, not the plain view
    scope.set_image_shift(0.0, 0.0)
    scope.move_stage(x_um=24.0, y_um=7.0)
    moved = scope.acquire(0.5)
    as_float = [np.asarray(f.image, dtype=np.float64) for f in (shifted, moved, plain)]
    assert np.corrcoef(as_float[0].ravel(), as_float[1].ravel())[0, 1] > np.corrcoef(
        as_float[0].ravel(), as_float[2].ravel()
    )[0, 1]


def test_simulator_image_shift_is_faster_than_a_stage_move(simulated_microscope: MakeMicroscope) -> None:
    scope = simulated_microscope(camera_px=256)
    scope.set_preset("search")
    scope.acquire(0.5)
    start = scope.microscope_time_s()
    scope.set_image_shift(5.0, 0.0)
    scope.acquire(0.5)
    by_shift_s = scope.microscope_time_s() - start
    start = scope.microscope_time_s()
    scope.set_image_shift(0.0, 0.0)
    scope.move_stage(x_um=10.0)
    scope.acquire(0.5)
    by_stage_s = scope.microscope_time_s() - start
    assert by_shift_s < by_stage_s - 1.0  # the stage's settling (2 s on the default profile) is not paid


@pytest.mark.parametrize("shift", [(15.5, 0.0), (0.0, -40.0), (float("nan"), 0.0), ("3", 0.0), (True, 0.0)])
def test_simulator_refuses_a_bad_shift_and_keeps_the_old_one(
    simulated_microscope: MakeMicroscope, shift: tuple[object, object]
) -> None:
    scope = simulated_microscope(camera_px=64)
    scope.set_image_shift(1.0, 2.0)
    with pytest.raises(InvalidParameterError):
        scope.set_image_shift(*shift)  # type: ignore[arg-type]
    assert scope.get_image_shift() == (1.0, 2.0)


def test_a_simulator_without_image_shift_says_so(simulated_microscope: MakeMicroscope) -> None:
    scope = simulated_microscope(camera_px=64, image_shift_limit_um=0.0)
    assert scope.info().image_shift_limit_um == 0.0 and image_shift_limit_um(scope) == 0.0
    with pytest.raises(InvalidParameterError, match="no image shift"):
        scope.set_image_shift(1.0, 0.0)


def test_image_shift_over_the_bridge(simulated_microscope: MakeMicroscope) -> None:
    scope = simulated_microscope(camera_px=64)
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:
        assert client.info().image_shift_limit_um == 15.0 and image_shift_limit_um(client) == 15.0
        client.set_image_shift(2.5, -1.0)
        assert client.get_image_shift() == (2.5, -1.0) and scope.get_image_shift() == (2.5, -1.0)
        assert client.acquire(0.1).metadata.image_shift_xy_um == (2.5, -1.0)
        with pytest.raises(InvalidParameterError, match="limit"):
            client.set_image_shift(99.0, 0.0)
        with pytest.raises(InvalidParameterError):
            client._call("set_image_shift", {"x_um": "1", "y_um": 0.0})  # strict: a string is not a number
        assert client.get_image_shift() == (2.5, -1.0)  # the server kept serving, the shift unchanged


class _NoShift:
    """A microscope without the image-shift methods (as a driver written before the capability)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name in ("get_image_shift", "set_image_shift"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_the_bridge_answers_a_missing_capability_with_an_error(simulated_microscope: MakeMicroscope) -> None:
    scope = _NoShift(simulated_microscope(camera_px=64))
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:  # type: ignore[arg-type]
        with pytest.raises(MicroscopeError, match="no set_image_shift"):
            client.set_image_shift(1.0, 0.0)
        assert client.get_preset()  # still serving


def test_temscript_adapter_image_shift() -> None:
    pytest.importorskip("temscript")
    from drivers.temscript_adapter import NULL_CONFIG, TemscriptMicroscope, create_temscript_microscope

    off = create_temscript_microscope("null")
    assert off.info().image_shift_limit_um == 0.0
    with pytest.raises(InvalidParameterError, match="off"):
        off.set_image_shift(1.0, 0.0)
    swapped = ((0.0, 1.0), (1.0, 0.0))
    config = NULL_CONFIG.model_copy(update={"image_shift_limit_um": 10.0, "image_shift_matrix": swapped})
    scope = create_temscript_microscope("null", config)
    assert isinstance(scope, TemscriptMicroscope) and scope.info().image_shift_limit_um == 10.0
    scope.set_image_shift(3.0, -2.0)
    raw = scope.instrument.get_image_shift()
    assert (raw[0], raw[1]) == pytest.approx((-2e-6, 3e-6))  # axes swapped by the matrix, metres at the instrument
    assert scope.get_image_shift() == pytest.approx((3.0, -2.0))
    scope.set_preset("search")
    assert scope.acquire(0.01).metadata.image_shift_xy_um == (3.0, -2.0)
    with pytest.raises(InvalidParameterError):
        scope.set_image_shift(11.0, 0.0)
