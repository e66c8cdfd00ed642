"""The evaluation runner: labelled images in, one score row per specimen x preset x method x mode out.

Images come from a simulated microscope (`simulated_images`: atlas frames centred on intact grid
squares, search frames near a crystal in such a square, ground truth from the specimen) or from a
user's labelled files (`agent.evaluation.labelled`). Every method runs on exactly the same images:

- the clustering locator (`agent.locate`: grid and sliding-window modes, several k, its default
  crystal-cluster rule, no operator);
- `threshold-cc`: robust threshold + connected components; `log-blob`: scikit-image LoG blobs
  (`agent.evaluation.baselines`).

Rows are micro-averaged over all images of a specimen and preset (see `agent.evaluation.scoring`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.evaluation.baselines import DetectorOutput, log_blobs, threshold_components
from agent.evaluation.scoring import DEFAULT_TOLERANCE_UM, Detection, FrameScore, combine_scores, score_frame
from agent.evaluation.truth import GroundTruth, ImageTruth, truth_for_frame
from agent.locate import defaults as locate_defaults
from drivers.base import Microscope

logger = logging.getLogger(__name__)

#: Outline line length at the simulator's search preset: 41 px of 0.04 um, 1.6 um, about its shortest facet.
SEARCH_OUTLINE_LENGTH_PX = 41
#: Targets from issue 8 at the `atlas` preset: specimen -> (recall, precision) to reach.
TARGETS: dict[str, tuple[float, float]] = {
    "protein-plates": (0.95, 0.9),
    "graphite-flakes": (0.95, 0.9),
    "asbestos-fibres": (0.95, 0.9),
    "polymer-faint": (0.8, 0.8),
}


class EvaluationError(Exception):
    """An evaluation cannot run (no images, bad configuration, a method that cannot be built)."""


class EvaluationConfig(BaseModel):
    """What to evaluate. Sizes in pixels, times in seconds, tolerances in micrometres."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specimens: tuple[str, ...] = ("protein-plates", "graphite-flakes", "asbestos-fibres", "polymer-faint")
    seeds: int = Field(default=3, ge=1, le=100, description="seeds 0..seeds-1 per specimen type")
    presets: tuple[str, ...] = ("atlas", "search")
    frames_per_seed: int = Field(default=2, ge=1, le=50, description="frames per seed and preset")
    camera_px: int = Field(default=1024, ge=128, le=8192, description="square simulated camera, pixels")
    exposure_s: float = Field(default=0.5, gt=0)
    modes: tuple[str, ...] = Field(
        default=(locate_defaults.MODE,), description="locator modes (default: the locator's, as `screen` uses)"
    )
    ks: tuple[int, ...] = Field(default=(locate_defaults.K,), description="cluster counts (default: the locator's)")
    default_k: int = Field(
        default=locate_defaults.K, ge=2, description="k whose atlas rows are checked against the targets"
    )
    baselines: bool = True
    tolerance_um: float = Field(default=DEFAULT_TOLERANCE_UM, gt=0, le=10.0)
    locator_settings: dict[str, Any] = Field(
        default_factory=dict, description="extra agent.locate LocateSettings (grid_rows, window_px, stride_px, ...)"
    )
    preset_locator_settings: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"search": {"outline_length_px": SEARCH_OUTLINE_LENGTH_PX}},
        description="more LocateSettings for one preset's images, on top of locator_settings (default: at search, "
        "faint crystals found by their straight edges too)",
    )

    @classmethod
    def quick(cls, **overrides: Any) -> EvaluationConfig:
        """About a minute on a 2-core machine: 2 seeds, atlas only, one 1024-px frame per seed, default locator."""
        values: dict[str, Any] = {"seeds": 2, "presets": ("atlas",), "frames_per_seed": 1}
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class LabelledImage:
    """One image with its truth and where it came from."""

    image: np.ndarray
    truth: ImageTruth
    specimen: str
    preset: str
    name: str
    stage_xy_um: tuple[float, float] | None = None


@dataclass(frozen=True)
class Method:
    """A detector under test: a name (`kmeans-k3`, `threshold-cc`, `log-blob`), a mode and its function."""

    name: str
    mode: str
    run: Callable[[np.ndarray], DetectorOutput]
    k: int | None = None
    #: preset name -> the run to use on that preset's images instead of `run`
    runs_by_preset: Mapping[str, Callable[[np.ndarray], DetectorOutput]] = field(default_factory=dict)


@dataclass
class Example:
    """One image per specimen and preset kept for the report, with every method's detections."""

    image: np.ndarray
    truth: ImageTruth
    name: str
    detections: dict[str, tuple[Detection, ...]] = field(default_factory=dict)
    bar_masks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Rows (JSON-ready dicts), target checks, examples for the report, timings."""

    rows: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    examples: dict[str, Example]
    config: dict[str, Any]
    elapsed_s: float
    n_images: int
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document `crystal-locator evaluate --json` writes."""
        return {
            "rows": self.rows,
            "targets": self.targets,
            "config": self.config,
            "elapsed_s": round(self.elapsed_s, 2),
            "n_images": self.n_images,
            "failures": self.failures,
            "matching": {
                "tolerance_um": self.config.get("tolerance_um"),
                "rule": "a detection is a true positive within tolerance_um of a crystal outline (capsule); "
                "recall counts crystals wholly inside the frame and off the bars",
            },
        }


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------


def baseline_methods() -> list[Method]:
    """The two comparison detectors."""
    return [
        Method(name="threshold-cc", mode="image", run=threshold_components),
        Method(name="log-blob", mode="image", run=log_blobs),
    ]


def locator_method(
    mode: str, k: int, seed: int = 0, preset_settings: Mapping[str, Mapping[str, Any]] | None = None, **settings: Any
) -> Method:
    """The clustering locator in `mode` ("grid" or "window") with `k` clusters and its default rule.

    Extra `settings` go to `agent.locate.analysis.LocateSettings` (unknown names raise `EvaluationError`);
    `preset_settings` adds settings for images of one preset (`Method.runs_by_preset`). Every candidate is
    kept (no cap on their number), so recall is not limited by a targeting budget.
    """
    try:
        from agent.locate.analysis import LocateSettings, analyse
        from agent.locate.targets import find_candidates
    except ImportError as exc:  # the locator is another package of this project
        raise EvaluationError(f"the locator (agent.locate.analysis / targets) is not available: {exc}") from exc

    def settings_of(extra: Mapping[str, Any]) -> LocateSettings:
        values: dict[str, Any] = {"mode": mode, "k": k, "seed": seed, **settings, **extra}
        if "max_candidates" in LocateSettings.model_fields and "max_candidates" not in values:
            values["max_candidates"] = 100_000
        unknown = [name for name in values if name not in LocateSettings.model_fields]
        if unknown:
            raise EvaluationError(f"unknown locator settings {unknown}; known: {sorted(LocateSettings.model_fields)}")
        try:
            return LocateSettings(**values)
        except ValueError as exc:
            raise EvaluationError(f"invalid locator settings {values}: {exc}") from exc

    def runner(locate_settings: LocateSettings) -> Callable[[np.ndarray], DetectorOutput]:
        def run(image: np.ndarray) -> DetectorOutput:
            analysis = analyse(image, locate_settings)
            candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, locate_settings, image=image)
            detections = tuple(
                Detection(row_px=c.row_px, col_px=c.col_px, area_px=c.area_px, score=c.score) for c in candidates
            )
            # film holes are masked too, but they are not bars
            bars = np.asarray(analysis.bar_mask_without_holes, dtype=bool)
            return DetectorOutput(detections=detections, bar_mask=bars)

        return run

    by_preset = {preset: runner(settings_of(extra)) for preset, extra in (preset_settings or {}).items()}
    return Method(name=f"kmeans-k{k}", mode=mode, run=runner(settings_of({})), k=k, runs_by_preset=by_preset)


def methods_for(config: EvaluationConfig) -> list[Method]:
    """Locator methods (every mode x k of `config`) then, if asked, the baselines."""
    methods = [
        locator_method(mode, k, preset_settings=config.preset_locator_settings, **config.locator_settings)
        for mode in config.modes
        for k in config.ks
    ]
    if config.baselines:
        methods += baseline_methods()
    return methods


# --------------------------------------------------------------------------------------------------
# images from a simulated microscope
# --------------------------------------------------------------------------------------------------


def atlas_positions(square_centres_um: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """`n` distinct intact square centres (um), chosen at random; fewer if there are fewer squares."""
    centres = np.asarray(square_centres_um, dtype=np.float64).reshape(-1, 2)
    if centres.shape[0] == 0:
        raise EvaluationError("the specimen has no intact grid square to image")
    pick = rng.choice(centres.shape[0], size=min(n, centres.shape[0]), replace=False)
    return [(float(centres[i, 0]), float(centres[i, 1])) for i in pick]


def search_positions(
    truth: GroundTruth,
    square_centres_um: np.ndarray,
    n: int,
    field_um: float,
    rng: np.random.Generator,
    half_open_um: float = 40.0,
) -> list[tuple[float, float]]:
    """Positions for search frames the way the loop takes them: near a crystal (a random one in a random
    intact square), offset by up to a quarter of the field of view in x and y. Falls back to square
    centres where a square holds no crystal."""
    centres = np.asarray(square_centres_um, dtype=np.float64).reshape(-1, 2)
    if centres.shape[0] == 0:
        raise EvaluationError("the specimen has no intact grid square to image")
    positions = []
    for i in rng.choice(centres.shape[0], size=n, replace=centres.shape[0] < n):
        x, y = centres[i]
        crystals = truth.crystals_in_box(x - half_open_um, x + half_open_um, y - half_open_um, y + half_open_um)
        if crystals:
            chosen = crystals[int(rng.integers(len(crystals)))]
            x, y = chosen.x_um, chosen.y_um
        dx, dy = rng.uniform(-field_um / 4, field_um / 4, size=2)
        positions.append((float(x + dx), float(y + dy)))
    return positions


def simulated_images(
    microscope: Microscope,
    truth: GroundTruth,
    *,
    specimen: str,
    seed: int,
    config: EvaluationConfig,
    square_centres_um: np.ndarray,
    true_matrix: Callable[[str], np.ndarray],
    true_stage_xy_um: Callable[[], tuple[float, float]] | None = None,
) -> Iterator[LabelledImage]:
    """Acquire `config.frames_per_seed` frames per preset of `config` and yield them with ground truth.

    `true_matrix(preset)` is the simulator's true image->stage matrix and `true_stage_xy_um()` where the
    specimen really is (stage backlash and repeat error included); ground truth must use both, so that a
    correct detection is not scored wrong because of stage error the agent could not know about.
    """
    rng = np.random.default_rng([seed, 8])
    for preset in config.presets:
        microscope.set_preset(preset)
        matrix = np.asarray(true_matrix(preset), dtype=np.float64)
        field_um = config.camera_px * float(np.sqrt(abs(np.linalg.det(matrix))))
        if preset == "atlas":
            positions = atlas_positions(square_centres_um, config.frames_per_seed, rng)
        else:
            positions = search_positions(truth, square_centres_um, config.frames_per_seed, field_um, rng)
        for index, (x_um, y_um) in enumerate(positions):
            microscope.move_stage(x_um=x_um, y_um=y_um)
            frame = microscope.acquire(config.exposure_s)
            stage_xy = (
                true_stage_xy_um()
                if true_stage_xy_um is not None
                else (frame.metadata.stage.x_um, frame.metadata.stage.y_um)
            )
            name = f"{specimen}/seed{seed}/{preset}/{index}"
            image_truth = truth_for_frame(truth, frame.shape_px, stage_xy, matrix, source=name)
            yield LabelledImage(
                image=np.asarray(frame.image),
                truth=image_truth,
                specimen=specimen,
                preset=preset,
                name=name,
                stage_xy_um=(float(stage_xy[0]), float(stage_xy[1])),
            )


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


def evaluate_images(
    images: Iterable[LabelledImage],
    methods: Sequence[Method],
    *,
    tolerance_um: float = DEFAULT_TOLERANCE_UM,
    default_k: int = 3,
    config: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Run every method on every image, score, and aggregate into rows (see the module docstring).

    A method that raises on an image is recorded in `failures` (and the row's `n_failed`) and the image
    is left out of that method's figures; the other methods still run.
    """
    if not methods:
        raise EvaluationError("no method to evaluate")
    start = time.perf_counter()
    tally = _Tally()
    examples: dict[str, Example] = {}
    n_images = 0
    for labelled in images:
        n_images += 1
        if progress is not None:
            progress(labelled.name)
        example_key = f"{labelled.specimen} / {labelled.preset}"
        example = examples.get(example_key)
        if example is None:
            example = examples[example_key] = Example(image=labelled.image, truth=labelled.truth, name=labelled.name)
        for method in methods:
            tally.run(method, labelled, example, tolerance_um)
    if n_images == 0:
        raise EvaluationError("no image to evaluate")
    rows = tally.rows(methods)
    targets = check_targets(rows, default_k=default_k)
    return EvaluationResult(
        rows=rows,
        targets=targets,
        examples=examples,
        config=dict(config or {}),
        elapsed_s=time.perf_counter() - start,
        n_images=n_images,
        failures=tally.failures,
    )


_RowKey = tuple[str, str, str, str]  # specimen, preset, method name, mode


@dataclass
class _Tally:
    """The frame scores of an evaluation so far, per row (specimen, preset, method, mode) in the order the
    rows first appeared, with the failed runs: counts per row and one message each."""

    scores: dict[_RowKey, list[FrameScore]] = field(default_factory=dict)
    failed: dict[_RowKey, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    order: list[_RowKey] = field(default_factory=list)

    def run(self, method: Method, labelled: LabelledImage, example: Example, tolerance_um: float) -> None:
        """Run `method` on one image (timed, seconds) and score it against the truth within `tolerance_um`;
        a failure is recorded instead. When the image is its specimen and preset's `example`, the
        detections (and bar mask) are kept there for the report."""
        key = (labelled.specimen, labelled.preset, method.name, method.mode)
        if key not in self.scores:
            self.scores[key] = []
            self.order.append(key)
        t0 = time.perf_counter()
        try:
            output = method.runs_by_preset.get(labelled.preset, method.run)(labelled.image)
        except Exception as exc:  # a method failing on one image must not end the whole evaluation
            logger.warning("%s %s failed on %s: %s", method.name, method.mode, labelled.name, exc)
            self.failures.append(f"{method.name}/{method.mode} on {labelled.name}: {type(exc).__name__}: {exc}")
            self.failed[key] = self.failed.get(key, 0) + 1
            return
        seconds = time.perf_counter() - t0
        bar_mask = output.bar_mask
        if bar_mask is not None and bar_mask.shape != labelled.image.shape:
            bar_mask = None
        score = score_frame(
            output.detections, labelled.truth, tolerance_um=tolerance_um, bar_mask=bar_mask, seconds=seconds
        )
        self.scores[key].append(score)
        if example.name == labelled.name:
            label = f"{method.name} ({method.mode})"
            example.detections[label] = output.detections
            if bar_mask is not None:
                example.bar_masks[label] = bar_mask

    def rows(self, methods: Sequence[Method]) -> list[dict[str, Any]]:
        """One JSON-ready row per key: the combined scores (`combine_scores`), k and the failure count."""
        k_of = {(m.name, m.mode): m.k for m in methods}
        rows = []
        for key in self.order:
            specimen, preset, name, mode = key
            summary = combine_scores(self.scores[key])
            rows.append(
                {
                    "specimen": specimen,
                    "preset": preset,
                    "method": name,
                    "mode": mode,
                    "k": k_of.get((name, mode)),
                    **summary.as_dict(),
                    "n_failed": self.failed.get(key, 0),
                }
            )
        return rows


def check_targets(rows: Sequence[dict[str, Any]], default_k: int = 3) -> list[dict[str, Any]]:
    """Compare atlas rows with `TARGETS`: the default locator (k = `default_k`) per mode, the best
    locator row (highest recall among those meeting the precision target, else highest F1), and each
    baseline. Missing figures count as not met."""
    result = []
    for specimen, (recall_goal, precision_goal) in TARGETS.items():
        atlas = [r for r in rows if r["specimen"] == specimen and r["preset"] == "atlas"]
        if not atlas:
            continue
        for row in atlas:
            is_default = row["k"] == default_k
            is_baseline = row["k"] is None
            if not (is_default or is_baseline):
                continue
            result.append(_target_entry(row, recall_goal, precision_goal, "default" if is_default else "baseline"))
        locator = [r for r in atlas if r["k"] is not None]
        if locator:
            best = max(locator, key=lambda r: _rank(r, precision_goal))
            result.append(_target_entry(best, recall_goal, precision_goal, "best-locator"))
    return result


def _rank(row: dict[str, Any], precision_goal: float) -> tuple[float, float]:
    precision = row["precision"] or 0.0
    recall = row["recall"] or 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return (recall if precision >= precision_goal else -1.0, f1)


def _target_entry(row: dict[str, Any], recall_goal: float, precision_goal: float, role: str) -> dict[str, Any]:
    precision = row["precision"]
    recall = row["recall"]
    met = precision is not None and recall is not None and precision >= precision_goal and recall >= recall_goal
    return {
        "specimen": row["specimen"],
        "role": role,
        "method": row["method"],
        "mode": row["mode"],
        "precision": precision,
        "recall": recall,
        "precision_goal": precision_goal,
        "recall_goal": recall_goal,
        "precision_gap": None if precision is None else round(precision - precision_goal, 4),
        "recall_gap": None if recall is None else round(recall - recall_goal, 4),
        "met": met,
    }
