"""The driver contract's data types and errors."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.base import (
    ERROR_TYPES,
    Frame,
    FrameMetadata,
    InvalidParameterError,
    MicroscopeInfo,
    OpticsPreset,
    PresetError,
    StageLimitError,
    StageLimits,
    StagePosition,
    check_exposure_s,
    resolve_stage_target,
)


def _metadata() -> FrameMetadata:
    return FrameMetadata(
        preset="atlas", magnification=100, pixel_size_um=0.5, stage=StagePosition(x_um=1, y_um=2),
        exposure_s=0.1, time_s=3.0,
    )


def test_stage_limits_name_every_violating_axis() -> None:
    limits = StageLimits(x_min_um=-10, x_max_um=10, y_min_um=-10, y_max_um=10)
    limits.check(StagePosition(x_um=10, y_um=-10))
    with pytest.raises(StageLimitError, match=r"x=11\.000 um.*y=-12\.000 um"):
        limits.check(StagePosition(x_um=11, y_um=-12))


def test_stage_position_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        StagePosition(x_um=float("nan"), y_um=0)


def test_frame_requires_2d_uint16_and_is_read_only() -> None:
    frame = Frame(image=np.zeros((4, 5), np.uint16), metadata=_metadata())
    assert frame.shape_px == (4, 5)
    with pytest.raises(ValueError):
        frame.image[0, 0] = 1
    with pytest.raises(InvalidParameterError, match="uint16"):
        Frame(image=np.zeros((4, 5), np.float32), metadata=_metadata())
    with pytest.raises(InvalidParameterError, match="2-D"):
        Frame(image=np.zeros((4, 5, 2), np.uint16), metadata=_metadata())


def test_frozen_models_cannot_change() -> None:
    position = StagePosition(x_um=1, y_um=2)
    with pytest.raises(ValueError):
        position.x_um = 3  # type: ignore[misc]


def test_info_finds_presets_by_name() -> None:
    info = MicroscopeInfo(
        name="x", camera_shape_px=(8, 8), software_version="1",
        presets=(OpticsPreset(name="atlas", magnification=100, pixel_size_um=1.0),),
        stage_limits=StageLimits(),
    )
    assert info.preset("atlas").pixel_size_um == 1.0
    with pytest.raises(PresetError, match="atlas"):
        info.preset("nope")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True, 1e6])
def test_exposure_validation(bad: object) -> None:
    with pytest.raises(InvalidParameterError):
        check_exposure_s(bad)  # type: ignore[arg-type]


def test_every_error_type_is_registered_by_name() -> None:
    for name, cls in ERROR_TYPES.items():
        assert cls.__name__ == name


def test_resolve_stage_target_keeps_axes_left_none() -> None:
    current = StagePosition(x_um=1.0, y_um=2.0, z_um=3.0, alpha_deg=4.0)
    target = resolve_stage_target(current, StageLimits(), y_um=np.float64(-5.5), alpha_deg=10)
    assert target == StagePosition(x_um=1.0, y_um=-5.5, z_um=3.0, alpha_deg=10.0)


@pytest.mark.parametrize("bad", ["1", True, float("nan"), float("inf")])
def test_resolve_stage_target_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="x_um"):
        resolve_stage_target(StagePosition(x_um=0.0, y_um=0.0), StageLimits(), x_um=bad)  # type: ignore[arg-type]


def test_resolve_stage_target_checks_the_limits() -> None:
    with pytest.raises(StageLimitError, match="z=400"):
        resolve_stage_target(StagePosition(x_um=0.0, y_um=0.0), StageLimits(), z_um=400.0)
